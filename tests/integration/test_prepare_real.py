"""Prepare phase and command-run prestart on the real daemon (python image).

The experiments stamp their own times; ordering is asserted against the records'
exits and gates.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from llem_dispatch import DockerRunner
from llem_dispatch.dispatch import Dispatcher, RunRecord
from llem_dispatch.dispatch.placement import LocalPlacement
from llem_dispatch.gpu import GpuPool
from tests.conftest import PYTHON_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leaked_containers")]

PREPARE_S = 0.8
WORK_S = 1.5
COOLDOWN_S = 0.1


@pytest.fixture
def prepared_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    (source / "prep.py").write_text(
        textwrap.dedent(
            f"""
            import os, time

            def run(config):
                prepare_start = time.time()
                time.sleep({PREPARE_S})  # weights into host memory
                prepare_end = time.time()
                yield
                gate = os.environ.get("LLEM_GO_PATH")
                assert gate is None or os.path.exists(gate), "resumed before its gate"
                yield
                work_start = time.time()
                time.sleep({WORK_S})
                return {{"i": config["i"], "prepare_start": prepare_start,
                         "prepare_end": prepare_end, "work_start": work_start}}
            """
        )
    )
    return source


def _sorted_ok(records: list[RunRecord]) -> list[RunRecord]:
    assert all(r.ok for r in records), [(r.status, r.error, r.failure) for r in records]
    return sorted(records, key=lambda r: r.result["data"]["work_start"])  # type: ignore[index]


async def test_a_container_prepares_while_another_holds_the_gpu(
    prepared_source: Path, test_labels: dict[str, str], exchange_base: Path
) -> None:
    runner = DockerRunner(
        PYTHON_IMAGE,
        function="prep:run",
        source_dir=prepared_source,
        gpu_passthrough=False,
        labels=test_labels,
        exchange_base=exchange_base,
        network="none",
        shm_size="16m",
    )
    pool = GpuPool.virtual_devices(1, cooldown_s=COOLDOWN_S)
    # `run`: it prepares beside the measured window (`pause` would hold it out of it).
    placement = LocalPlacement(runner, pool, prestart=True, isolation="run")
    with anyio.fail_after(120):
        async with Dispatcher(placement=placement) as dispatcher:
            records = [r async for r in dispatcher.map([{"i": i} for i in range(3)], gpus=1)]
    records = _sorted_ok(records)
    for prev, nxt in itertools.pairwise(records):
        data = nxt.result["data"]  # type: ignore[index]
        assert nxt.prestarted
        assert prev.exited_at is not None
        assert nxt.gate_opened_at is not None
        assert data["prepare_end"] < prev.exited_at.timestamp()
        assert data["work_start"] >= nxt.gate_opened_at.timestamp()
        assert nxt.prepare_s == pytest.approx(PREPARE_S, abs=0.5)
        assert nxt.gate_wait_s is not None
        assert nxt.gate_wait_s > 0
        assert nxt.gate_to_work_s is not None
        assert 0 <= nxt.gate_to_work_s < PREPARE_S


async def test_a_python_command_runs_unchanged_after_the_gate(
    test_labels: dict[str, str], exchange_base: Path
) -> None:
    script = textwrap.dedent(
        """
        import json, os, sys, time
        gate = os.environ.get("LLEM_GO_PATH")
        assert gate is None or os.path.exists(gate), "ran before its gate"
        with open(os.environ["LLEM_MARKS_PATH"], "a") as marks:
            marks.write(json.dumps({"mark": "work", "t": time.time()}) + "\\n")
        time.sleep(1.0)
        with open(os.environ["LLEM_RESULT_PATH"], "w") as out:
            json.dump({"argv": sys.argv[1:], "gated": gate is not None}, out)
        """
    )
    runner = DockerRunner(
        PYTHON_IMAGE,
        command=["python3", "-c", script, "a b", "$HOME"],
        gpu_passthrough=False,
        labels=test_labels,
        exchange_base=exchange_base,
        network="none",
        shm_size="16m",
    )
    pool = GpuPool.virtual_devices(1, cooldown_s=COOLDOWN_S)
    with anyio.fail_after(90):
        async with Dispatcher(runner, pool=pool, prestart=True) as dispatcher:
            records = [r async for r in dispatcher.map([{"i": i} for i in range(3)], gpus=1)]
    assert all(r.ok for r in records), [(r.status, r.error, r.failure) for r in records]
    for record in records:
        assert record.result is not None
        assert record.result["data"]["argv"] == ["a b", "$HOME"]  # untouched by the gate
        assert record.gate_to_work_s is not None
        assert record.gate_to_work_s >= 0
    prestarted = [r for r in records if r.prestarted]
    assert len(prestarted) == 2
    assert all(r.result["data"]["gated"] for r in prestarted)  # type: ignore[index]


@pytest.fixture
def no_shell_image(tmp_path: Path) -> Iterator[str]:
    """An image with one static program and no /bin/sh (as distroless images are)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("needs a static busybox on the host (apt-get install busybox-static)")
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "true")
    tar = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(tar), "."], check=True, timeout=60)
    image = f"llem-test/no-shell:{os.getpid()}"
    subprocess.run(
        ["docker", "import", str(tar), image], check=True, capture_output=True, timeout=120
    )
    yield image
    subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True, check=False)


async def test_an_image_without_a_shell_cannot_be_prestarted_and_says_so(
    no_shell_image: str, test_labels: dict[str, str], exchange_base: Path
) -> None:
    runner = DockerRunner(
        no_shell_image,
        command=["/bin/true"],
        gpu_passthrough=False,
        labels=test_labels,
        exchange_base=exchange_base,
        network="none",
        shm_size="16m",
    )
    pool = GpuPool.virtual_devices(1)
    with anyio.fail_after(60):
        async with Dispatcher(runner, pool=pool, prestart=True) as dispatcher:
            records = [r async for r in dispatcher.map([{"i": 0}, {"i": 1}], gpus=1)]
    gated = [r for r in records if r.prestarted]
    assert len(gated) == 1
    assert gated[0].error is not None
    assert gated[0].error.fix_suggestion is not None
    assert "no /bin/sh" in gated[0].error.fix_suggestion
    assert "prestart: false" in gated[0].error.fix_suggestion
