"""llenergymeasure's own image contract, run unchanged through DockerRunner.

The image runs a copy of llenergymeasure's entrypoint logic (lem_image/entrypoint.py):
it names the result by its own hash of the config with defaults filled in, and
writes `{hash}_error.json` then re-raises on failure.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from llem_dispatch import DockerRunner, ExperimentFailure, ExperimentResult, ResultError
from llem_dispatch.dispatch import Dispatcher
from llem_dispatch.gpu import GpuPool
from tests.conftest import PYTHON_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leaked_containers")]

IMAGE = "llem-test/lem-entrypoint:1"
HERE = Path(__file__).parent / "lem_image"


@pytest.fixture(scope="module")
def lem_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    context = tmp_path_factory.mktemp("lem-image")
    (context / "entrypoint.py").write_text((HERE / "entrypoint.py").read_text())
    (context / "Dockerfile").write_text(
        f"FROM {PYTHON_IMAGE}\nCOPY entrypoint.py /app/entrypoint.py\n"
        'CMD ["python3", "/app/entrypoint.py"]\n'
    )
    subprocess.run(
        ["docker", "build", "-q", "-t", IMAGE, str(context)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield IMAGE
    subprocess.run(["docker", "image", "rm", "-f", IMAGE], capture_output=True, check=False)


def runner(
    image: str, labels: dict[str, str], exchange_base: Path, *, gpu_passthrough: bool = True
) -> DockerRunner:
    return DockerRunner(
        image,
        gpu_passthrough=gpu_passthrough,
        network="none",
        shm_size="16m",
        timeout=60,
        labels=labels,
        exchange_base=exchange_base,
    )


async def test_their_image_succeeds_unchanged(
    lem_image: str, test_labels: dict[str, str], exchange_base: Path
) -> None:
    async with runner(lem_image, test_labels, exchange_base) as r:
        result = await r.run({"model": "llama-8b", "batch_size": 8})
    assert isinstance(result, ExperimentResult)
    assert result.data["tokens_per_s"] == 1234.5
    assert result.data["precision"] == "bf16"  # their defaults were filled in
    # Their hash (defaults filled, default separators) names the file; the record says so.
    assert result.runner.result_file == f"{result.data['config_hash']}_result.json"
    assert result.data["config_hash"] != result.config_hash
    assert list(exchange_base.iterdir()) == []


async def test_their_failure_is_an_experiment_failure(
    lem_image: str, test_labels: dict[str, str], exchange_base: Path
) -> None:
    async with runner(lem_image, test_labels, exchange_base) as r:
        outcome = await r.run({"model": "llama-8b", "fail": "oom-on-purpose"})
    assert isinstance(outcome, ExperimentFailure)
    assert outcome.type == "ValueError"
    assert "fail=oom-on-purpose" in outcome.message
    assert outcome.traceback is not None
    assert "run_container_experiment" in outcome.traceback
    assert outcome.exit_code == 1
    assert outcome.exchange_dir is not None
    assert Path(outcome.exchange_dir).is_dir(), "a failure keeps its exchange dir"


async def test_two_result_files_are_a_clear_error(
    lem_image: str, test_labels: dict[str, str], exchange_base: Path
) -> None:
    script = (
        'echo "{}" > "$LLEM_EXCHANGE_DIR/aaaa_result.json"; '
        'echo "{}" > "$LLEM_EXCHANGE_DIR/bbbb_result.json"'
    )
    r = DockerRunner(
        lem_image,
        command=["sh", "-c", script],
        network="none",
        shm_size="16m",
        labels=test_labels,
        exchange_base=exchange_base,
    )
    async with r:
        with pytest.raises(ResultError, match=r"aaaa_result\.json, bbbb_result\.json"):
            await r.run({"x": 1})


async def test_their_entrypoint_runs_unchanged_under_prestart(
    lem_image: str, test_labels: dict[str, str], exchange_base: Path
) -> None:
    # Their image's own CMD runs behind the shell gate: same results, same failures.
    configs = [
        {"model": "llama-8b", "batch_size": 1},
        {"model": "llama-8b", "fail": "oom-on-purpose"},
        {"model": "llama-8b", "batch_size": 8, "precision": "fp16"},
    ]
    pool = GpuPool.virtual_devices(1, cooldown_s=0.05)
    async with runner(lem_image, test_labels, exchange_base, gpu_passthrough=False) as r:
        with anyio.fail_after(120):
            async with Dispatcher(r, pool=pool, prestart=True) as dispatcher:
                records = [rec async for rec in dispatcher.map(configs, gpus=1)]
    by_config = {json.dumps(rec.config, sort_keys=True): rec for rec in records}
    assert sum(rec.prestarted for rec in records) == 2
    ok = [by_config[json.dumps(c, sort_keys=True)] for c in (configs[0], configs[2])]
    for record in ok:
        assert record.ok, (record.error, record.failure)
        assert record.result is not None
        data = record.result["data"]
        assert data["tokens_per_s"] == 1234.5
        assert record.result["runner"]["result_file"] == f"{data['config_hash']}_result.json"
    assert ok[1].result is not None
    assert ok[1].result["data"]["precision"] == "fp16"
    failed = by_config[json.dumps(configs[1], sort_keys=True)]
    assert failed.status == "failed"
    assert failed.failure is not None
    assert failed.failure.type == "ValueError"
    assert "fail=oom-on-purpose" in failed.failure.message
    for record in records:
        if record.prestarted:
            assert record.gate_opened_at is not None
            assert record.gate_wait_s is not None
