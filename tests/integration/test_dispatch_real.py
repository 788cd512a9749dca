"""Dispatcher and studies on real runners: GPUs never shared, all busy, cooldown, resume."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from llem_dispatch import DockerRunner, GpuRequestError, LocalRunner, Runner
from llem_dispatch.dispatch import Dispatcher, RunRecord
from llem_dispatch.gpu import GpuPool
from llem_dispatch.study import Study, completed_keys, iter_records, run_study
from tests.conftest import BUSYBOX_IMAGE, require_docker

pytestmark = pytest.mark.usefixtures("no_leaked_containers")

# Sleeps long enough that 4 GPUs overlap for sure despite ~0.4 s container starts.
WORK = 'sleep 1.2; echo "{\\"gpus\\": \\"$LLEM_GPU_IDS\\"}" > "$LLEM_RESULT_PATH"'


@pytest.fixture(params=["docker", "local"])
async def make_runner(
    request: pytest.FixtureRequest, test_labels: dict[str, str], exchange_base: Path
) -> AsyncIterator[Callable[[str], Runner]]:
    if request.param == "docker":
        require_docker(request)

    def make(script: str) -> Runner:
        if request.param == "docker":
            return DockerRunner(
                BUSYBOX_IMAGE,
                command=["sh", "-c", script],
                gpu_passthrough=False,
                labels=test_labels,
                exchange_base=exchange_base,
                shm_size="16m",
                network="none",
                stop_grace_s=1,
            )
        return LocalRunner(["sh", "-c", script], exchange_base=exchange_base)

    return make


def intervals(records: list[RunRecord]) -> dict[str, list[tuple[datetime, datetime]]]:
    per_gpu: dict[str, list[tuple[datetime, datetime]]] = {}
    for record in records:
        assert record.started_at is not None
        assert record.exited_at is not None
        for gpu in record.gpu_ids:
            per_gpu.setdefault(gpu, []).append((record.started_at, record.exited_at))
    return per_gpu


def max_parallel_gpus(records: list[RunRecord]) -> int:
    points: list[tuple[datetime, int]] = []
    for record in records:
        assert record.started_at is not None
        assert record.exited_at is not None
        points += [
            (record.started_at, len(record.gpu_ids)),
            (record.exited_at, -len(record.gpu_ids)),
        ]
    busy = peak = 0
    for _, delta in sorted(points, key=lambda p: (p[0], p[1])):
        busy += delta
        peak = max(peak, busy)
    return peak


async def test_mixed_1_and_2_gpu_jobs_never_share_and_fill_all_gpus(
    make_runner: Callable[[str], Runner],
) -> None:
    pool = GpuPool.virtual_devices(4)
    jobs = [({"i": i}, 2 if i % 3 == 0 else 1) for i in range(12)]
    records: list[RunRecord] = []
    async with Dispatcher(make_runner(WORK), pool=pool) as dispatcher:

        async def one(config: dict[str, Any], k: int) -> None:
            records.append(await dispatcher.run(config, gpus=k))

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tg:
                for config, k in jobs:
                    tg.start_soon(one, config, k)
    assert len(records) == 12
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    for record in records:
        k = 2 if record.config["i"] % 3 == 0 else 1
        assert len(record.gpu_ids) == k
        assert record.result is not None
        assert record.result["data"]["gpus"] == ",".join(record.gpu_ids)
    for gpu, spans in intervals(records).items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"GPU {gpu} held by two experiments at once"
    assert max_parallel_gpus(records) == 4, "all 4 GPUs were busy at the same time"


async def test_cooldown_gap_is_honoured(make_runner: Callable[[str], Runner]) -> None:
    pool = GpuPool.virtual_devices(1, cooldown_s=1.0)
    async with Dispatcher(make_runner('echo "{}" > "$LLEM_RESULT_PATH"'), pool=pool) as d:
        records = [r async for r in d.map([{"i": i} for i in range(3)], gpus=1)]
    assert all(r.ok for r in records)
    spans = sorted(intervals(records)["0"])
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert (start - end).total_seconds() >= 1.0
    gaps = [r.handoff_gap_s for r in records if r.handoff_gap_s is not None]
    assert len(gaps) == 2
    assert all(g >= 1.0 for g in gaps)


async def test_request_over_pool_size_fails_at_once(make_runner: Callable[[str], Runner]) -> None:
    async with Dispatcher(make_runner("true"), pool=GpuPool.virtual_devices(4)) as d:
        with anyio.fail_after(2), pytest.raises(GpuRequestError, match="5"):
            await d.run({"x": 1}, gpus=5)


async def test_study_resume_after_cancel_gives_each_result_once(
    make_runner: Callable[[str], Runner], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    study = Study.model_validate(
        {"name": "resume", "grid": {"x": list(range(8))}, "gpus_per_experiment": 1}
    )
    out = tmp_path / "results"
    script = 'sleep 0.5; echo "{\\"x\\": 1}" > "$LLEM_RESULT_PATH"'
    pool = GpuPool.virtual_devices(2)
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: run_study(
                    study, out, runner=make_runner(script), pool=pool, reap_orphans=False
                )
            )
            while len(completed_keys(out)) < 3:
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
    done_first = completed_keys(out)
    assert 3 <= len(done_first) < 8
    summary = await run_study(
        study,
        out,
        runner=make_runner(script),
        pool=GpuPool.virtual_devices(2),
        resume=True,
        reap_orphans=False,
    )
    assert summary.skipped == len(done_first)
    assert summary.succeeded == 8 - len(done_first)
    records = list(iter_records(out))
    assert len(records) == 8
    assert sorted(r["key"] for r in records) == sorted({r["key"] for r in records})
    assert all(r["status"] == "succeeded" for r in records)
    if request.node.get_closest_marker("docker") is not None:  # the docker variant
        leftover = subprocess.run(
            # This study's containers only: other suites may share the daemon.
            ["docker", "ps", "-aq", "--filter", f"label=llem.results_dir={out.resolve()}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert leftover == []
