"""Prestart through LocalRunner processes: gated start-up, hand-off, intervals, clean-up."""

from __future__ import annotations

import itertools
import os
import textwrap
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from llem_dispatch import LocalRunner
from llem_dispatch.dispatch import Dispatcher, RunRecord
from llem_dispatch.dispatch.placement import LocalPlacement
from llem_dispatch.gpu import GpuPool
from llem_dispatch.testing import FakeRunner

STARTUP_S = 0.6
COOLDOWN_S = 0.05


@pytest.fixture
def slow_module(tmp_path: Path) -> Path:
    """A module that takes STARTUP_S to import, then runs briefly on its GPU."""
    (tmp_path / "slowstart.py").write_text(
        textwrap.dedent(
            f"""
            import os, time
            open(f"started-{{os.getpid()}}.pid", "w").close()
            time.sleep({STARTUP_S})  # imports: torch, vllm...

            def run(config):
                gate = os.environ.get("LLEM_GO_PATH")
                assert gate is None or os.path.exists(gate), "ran before the gate opened"
                if config.get("fail_import"):
                    raise ImportError("no such library")
                time.sleep(config.get("work_s", 0.2))
                return {{"i": config["i"], "gpus": os.environ["CUDA_VISIBLE_DEVICES"]}}
            """
        )
    )
    (tmp_path / "badimport.py").write_text("raise ImportError('missing at import')\n")
    return tmp_path


def runner(module_dir: Path, exchange_base: Path, **options: object) -> LocalRunner:
    return LocalRunner(
        function="slowstart:run", cwd=module_dir, exchange_base=exchange_base, **options
    )  # type: ignore[arg-type]


def assert_windows_disjoint(records: list[RunRecord], cooldown_s: float) -> None:
    """No GPU in two runs (gate/start -> exit) at once; a cooldown from each one's work end."""
    by_gpu: dict[str, list[RunRecord]] = {}
    for record in records:
        assert record.started_at is not None
        assert record.exited_at is not None
        for gpu in record.gpu_ids:
            by_gpu.setdefault(gpu, []).append(record)
    slack = timedelta(milliseconds=5)  # wall clock vs the pool's monotonic clock
    for runs in by_gpu.values():
        runs.sort(key=lambda r: r.started_at)  # type: ignore[arg-type, return-value]
        for prev, nxt in itertools.pairwise(runs):
            assert nxt.started_at >= prev.exited_at - slack  # type: ignore[operator]
            # The cooldown counts from the end of the work (`done`), else from the exit.
            ended = prev.work_ended_at or prev.exited_at
            assert nxt.started_at >= ended + timedelta(seconds=cooldown_s) - slack  # type: ignore[operator]


async def test_prestart_hides_the_start_up_and_keeps_gpus_exclusive(
    slow_module: Path, tmp_path: Path
) -> None:
    pool = GpuPool.virtual_devices(2, cooldown_s=COOLDOWN_S)
    configs = [{"i": i} for i in range(6)]
    with anyio.fail_after(30):
        async with Dispatcher(runner(slow_module, tmp_path), pool=pool, prestart=True) as d:
            records = [r async for r in d.map(configs, gpus=1)]
    assert all(r.ok for r in records), [r.error for r in records]
    prestarted = [r for r in records if r.prestarted]
    assert len(prestarted) == 4  # all but the first on each GPU
    for record in prestarted:
        assert record.gate_opened_at is not None
        assert record.result is not None
        assert record.result["data"]["gpus"] == record.gpu_ids[0]
        # The GPU waited for its cooldown and the gate, not for the start-up.
        assert record.handoff_gap_s is not None
        assert record.handoff_gap_s < COOLDOWN_S + STARTUP_S / 2
    assert_windows_disjoint(records, COOLDOWN_S)
    assert pool.busy() == {}


async def test_without_prestart_the_gpu_waits_for_the_start_up(
    slow_module: Path, tmp_path: Path
) -> None:
    pool = GpuPool.virtual_devices(1)
    with anyio.fail_after(30):
        async with Dispatcher(runner(slow_module, tmp_path), pool=pool) as d:
            records = [r async for r in d.map([{"i": 0}, {"i": 1}], gpus=1)]
    assert not any(r.prestarted for r in records)
    gaps = [r.handoff_gap_s for r in records if r.handoff_gap_s is not None]
    # Without a gate `started` is the process start; the import happens inside.
    assert gaps
    assert all(r.gate_opened_at is None for r in records)


async def test_an_experiment_failing_before_its_gate_frees_the_promise(
    slow_module: Path, tmp_path: Path
) -> None:
    pool = GpuPool.virtual_devices(1, cooldown_s=10.0)
    bad = LocalRunner(function="badimport:run", cwd=slow_module, exchange_base=tmp_path)
    good = runner(slow_module, tmp_path)
    with anyio.fail_after(20):
        async with Dispatcher(good, pool=pool, prestart=True) as d:
            placement = d.placement
            assert isinstance(placement, LocalPlacement)
            async with anyio.create_task_group() as tg:
                first: list[RunRecord] = []

                async def hold() -> None:
                    first.append(await d.run({"i": 0, "work_s": 1.5}, gpus=1))

                tg.start_soon(hold)
                await anyio.sleep(0.3)
                placement.runner = bad  # the next one dies at import, before its gate
                failed = await d.run({"i": 1}, gpus=1)
            placement.runner = good
    assert failed.prestarted
    assert failed.status == "failed"
    assert failed.gate_opened_at is None
    assert failed.failure is not None
    assert failed.failure.type == "ImportError"
    assert first[0].ok
    # The promise went back with no cooldown: only the first's release cooled down.
    assert pool.promised() == ()


async def test_cancelling_a_run_held_at_its_gate_leaves_no_process(
    slow_module: Path, tmp_path: Path
) -> None:
    pool = GpuPool.virtual_devices(1)
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    records: list[RunRecord] = []

    async def one(i: int, work_s: float) -> None:
        records.append(await d.run({"i": i, "work_s": work_s}, gpus=1))

    d = Dispatcher(runner(slow_module, exchange), pool=pool, prestart=True)
    with anyio.fail_after(20):
        async with d, anyio.create_task_group() as tg:
            tg.start_soon(one, 0, 30.0)
            await anyio.sleep(0.2)
            tg.start_soon(one, 1, 0.1)
            await anyio.sleep(STARTUP_S + 0.5)  # both started, the second at its gate
            tg.cancel_scope.cancel()
    pids = [int(p.name.split("-")[1].split(".")[0]) for p in slow_module.glob("started-*.pid")]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert pool.busy() == {}
    assert pool.promised() == ()
    assert pool.waiting() == ()


async def test_prestart_is_off_for_a_runner_without_the_gate() -> None:
    placement = LocalPlacement(FakeRunner(), GpuPool.virtual_devices(2), prestart=True)
    assert placement.prestart is False
    assert placement.parallelism() == 8


async def test_command_runs_are_prestarted_behind_the_shell_gate() -> None:
    command = LocalPlacement(LocalRunner(["true"]), GpuPool.virtual_devices(8), prestart=True)
    assert command.prestart is True
    assert command.parallelism() == 16


async def test_prestart_doubles_parallelism_for_function_runs(tmp_path: Path) -> None:
    placement = LocalPlacement(
        LocalRunner(function="m:f"), GpuPool.virtual_devices(8), prestart=True
    )
    assert placement.prestart is True
    assert placement.parallelism() == 16
