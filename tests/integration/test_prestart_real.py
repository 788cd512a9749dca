"""Prestart on the real daemon: containers held at their gate, GPUs exclusive, no leftovers."""

from __future__ import annotations

import itertools
import textwrap
from datetime import timedelta
from functools import partial
from pathlib import Path

import anyio
import pytest

from llem_dispatch import DockerRunner
from llem_dispatch.dispatch import Dispatcher, RunRecord
from llem_dispatch.gpu import GpuPool
from tests.conftest import BUSYBOX_IMAGE, PYTHON_IMAGE, labelled_containers

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leaked_containers")]

STARTUP_S = 1.0
COOLDOWN_S = 0.1


@pytest.fixture
def slow_source(tmp_path: Path) -> Path:
    """A module that takes STARTUP_S to import, then works briefly on its GPU."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "slowstart.py").write_text(
        textwrap.dedent(
            f"""
            import os, time
            time.sleep({STARTUP_S})  # imports: torch, vllm...

            def run(config):
                gate = os.environ.get("LLEM_GO_PATH")  # unset: not prestarted
                assert gate is None or os.path.exists(gate), "ran before its gate"
                time.sleep(config.get("work_s", 0.5))
                return {{"i": config["i"], "gpus": os.environ["LLEM_GPU_IDS"]}}
            """
        )
    )
    return source


def make_runner(
    source: Path, labels: dict[str, str], exchange_base: Path, **options: object
) -> DockerRunner:
    return DockerRunner(
        PYTHON_IMAGE,
        function="slowstart:run",
        source_dir=source,
        gpu_passthrough=False,
        labels=labels,
        exchange_base=exchange_base,
        network="none",
        shm_size="16m",
        stop_grace_s=1,
        **options,  # type: ignore[arg-type]
    )


def assert_measured_windows_disjoint(records: list[RunRecord], cooldown_s: float) -> None:
    """The interval check: per GPU, no two measured windows overlap; cooldowns between."""
    by_gpu: dict[str, list[tuple[object, object, object]]] = {}
    for record in records:
        assert record.started_at is not None
        assert record.exited_at is not None
        ended = record.work_ended_at or record.exited_at  # the cooldown counts from here
        for gpu in record.gpu_ids:
            by_gpu.setdefault(gpu, []).append((record.started_at, record.exited_at, ended))
    slack = timedelta(milliseconds=5)
    for spans in by_gpu.values():
        spans.sort()
        for (_, end, ended), (start, _, _) in itertools.pairwise(spans):
            assert start >= end - slack  # type: ignore[operator]
            assert start >= ended + timedelta(seconds=cooldown_s) - slack  # type: ignore[operator]


async def test_prestarted_containers_wait_at_their_gate_and_never_share_a_gpu(
    slow_source: Path, test_labels: dict[str, str], exchange_base: Path
) -> None:
    pool = GpuPool.virtual_devices(2, cooldown_s=COOLDOWN_S)
    runner = make_runner(slow_source, test_labels, exchange_base)
    with anyio.fail_after(120):
        async with Dispatcher(runner, pool=pool, prestart=True) as dispatcher:
            records = [r async for r in dispatcher.map([{"i": i} for i in range(6)], gpus=1)]
    assert all(r.ok for r in records), [(r.status, r.error, r.failure) for r in records]
    prestarted = [r for r in records if r.prestarted]
    assert len(prestarted) >= 3
    for record in prestarted:
        assert record.gate_opened_at is not None
        assert record.result is not None
        assert record.result["data"]["gpus"] == record.gpu_ids[0]
        assert record.handoff_gap_s is not None
        # The GPU waited for its cooldown and the gate, not for a container start-up.
        assert record.handoff_gap_s < COOLDOWN_S + 0.25
    assert_measured_windows_disjoint(records, COOLDOWN_S)


async def test_timeout_counts_from_the_gate(
    slow_source: Path, test_labels: dict[str, str], exchange_base: Path
) -> None:
    # The second is created ~4 s before its gate opens and works 2 s after it: past a
    # 5 s timeout counted from its creation, well within one counted from its gate.
    pool = GpuPool.virtual_devices(1)
    runner = make_runner(slow_source, test_labels, exchange_base, timeout=5.0)
    configs = [{"i": 0, "work_s": 2.5}, {"i": 1, "work_s": 2.0}]
    with anyio.fail_after(60):
        async with Dispatcher(runner, pool=pool, prestart=True) as dispatcher:
            records = [r async for r in dispatcher.map(configs, gpus=1)]
    assert all(r.ok for r in records), [(r.status, r.error) for r in records]
    second = next(r for r in records if r.prestarted)
    assert second.ended_at is not None
    assert (second.ended_at - second.queued_at).total_seconds() > 5.0


async def test_cancelling_leaves_no_container_held_at_a_gate(
    slow_source: Path, test_labels: dict[str, str], exchange_base: Path
) -> None:
    pool = GpuPool.virtual_devices(1)
    runner = make_runner(slow_source, test_labels, exchange_base)
    label = f"llem.test.node={test_labels['llem.test.node']}"
    seen: list[int] = []
    dispatcher = Dispatcher(runner, pool=pool, prestart=True)
    with anyio.fail_after(60):
        async with dispatcher, anyio.create_task_group() as tg:
            tg.start_soon(partial(dispatcher.run, {"i": 0, "work_s": 60}, gpus=1))
            await anyio.sleep(0.5)
            tg.start_soon(partial(dispatcher.run, {"i": 1}, gpus=1))
            await anyio.sleep(STARTUP_S + 2.0)
            seen.append(len(labelled_containers(label, running_only=True)))
            tg.cancel_scope.cancel()
    assert seen == [2]  # the running one and the one at its gate
    assert labelled_containers(label) == []
    assert pool.busy() == {}


async def test_a_busybox_command_is_held_at_the_shell_gate(
    test_labels: dict[str, str], exchange_base: Path
) -> None:
    # Busybox has no python: its own command waits behind the shell gate, then runs.
    script = (
        '[ -z "$LLEM_GO_PATH" ] || [ -e "$LLEM_GO_PATH" ] || exit 3; '
        'echo "{\\"gated\\": \\"${LLEM_GO_PATH:+yes}\\"}" > "$LLEM_RESULT_PATH"; sleep 1'
    )
    runner = DockerRunner(
        BUSYBOX_IMAGE,
        command=["sh", "-c", script],
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
    prestarted = [r for r in records if r.prestarted]
    assert len(prestarted) == 2
    for record in prestarted:
        assert record.result is not None
        assert record.result["data"]["gated"] == "yes"
        assert record.gate_wait_s is not None
        assert record.gate_wait_s > 0.2  # created while its predecessor worked 1 s
        assert record.handoff_gap_s is not None
        assert record.handoff_gap_s < COOLDOWN_S + 0.25
    assert_measured_windows_disjoint(records, COOLDOWN_S)
