"""The prepare phase and the memory reserve through LocalRunner processes (real ones).

Ordering is asserted on the times the experiments write themselves, against the
records' exits and gates: no sleeps to hope on.
"""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import anyio
import pytest

from llem_dispatch import LocalRunner
from llem_dispatch.dispatch import Dispatcher, RunRecord
from llem_dispatch.dispatch.memory import MemoryReserve, meminfo_bytes
from llem_dispatch.dispatch.placement import LocalPlacement
from llem_dispatch.gpu import GpuPool

PREPARE_S = 0.4
WORK_S = 0.8
COOLDOWN_S = 0.05


@pytest.fixture
def prepared_module(tmp_path: Path) -> Path:
    """A generator experiment that stamps its prepare part and its work."""
    (tmp_path / "prep.py").write_text(
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
                time.sleep(config.get("work_s", {WORK_S}))
                return {{"i": config["i"], "prepare_start": prepare_start,
                         "prepare_end": prepare_end, "work_start": work_start}}
            """
        )
    )
    return tmp_path


def _by_start(records: list[RunRecord]) -> list[RunRecord]:
    assert all(r.ok for r in records), [(r.error, r.failure) for r in records]
    return sorted(records, key=lambda r: r.result["data"]["work_start"])  # type: ignore[index]


async def test_prepare_runs_while_another_experiment_holds_the_gpu(
    prepared_module: Path, tmp_path: Path
) -> None:
    pool = GpuPool.virtual_devices(1, cooldown_s=COOLDOWN_S)
    runner = LocalRunner(function="prep:run", cwd=prepared_module, exchange_base=tmp_path)
    # `run`: preparation goes on beside the measured windows (`pause` holds it out of them).
    placement = LocalPlacement(runner, pool, prestart=True, isolation="run")
    with anyio.fail_after(30):
        async with Dispatcher(placement=placement) as d:
            records = _by_start([r async for r in d.map([{"i": i} for i in range(3)], gpus=1)])
    for prev, nxt in itertools.pairwise(records):
        data = nxt.result["data"]  # type: ignore[index]
        assert nxt.prestarted
        assert prev.exited_at is not None
        assert nxt.gate_opened_at is not None
        # Prepared before the previous experiment let go of the GPU...
        assert data["prepare_end"] < prev.exited_at.timestamp()
        # ...and worked on it only after its gate, after the cooldown.
        assert data["work_start"] >= nxt.gate_opened_at.timestamp()
        assert nxt.gate_opened_at.timestamp() >= prev.exited_at.timestamp()
        assert prev.work_ended_at is not None  # the cooldown counts from its `done` mark
        assert nxt.gate_opened_at.timestamp() >= prev.work_ended_at.timestamp() + COOLDOWN_S - 0.005
        assert nxt.prepare_s == pytest.approx(PREPARE_S, abs=0.3)
        assert nxt.gate_wait_s is not None
        assert nxt.gate_wait_s > 0
        # From the gate to the work: the resume, not the prepare part.
        assert nxt.gate_to_work_s is not None
        assert 0 <= nxt.gate_to_work_s < PREPARE_S
        assert nxt.work_started_at is not None
        assert nxt.work_started_at.timestamp() == pytest.approx(data["work_start"], abs=0.01)
        assert nxt.ready_rss_bytes is not None
        assert nxt.ready_rss_bytes > 0


async def test_without_prestart_the_prepare_part_is_on_the_gpus_time(
    prepared_module: Path, tmp_path: Path
) -> None:
    pool = GpuPool.virtual_devices(1)
    runner = LocalRunner(function="prep:run", cwd=prepared_module, exchange_base=tmp_path)
    with anyio.fail_after(30):
        async with Dispatcher(runner, pool=pool) as d:
            records = _by_start([r async for r in d.map([{"i": 0}, {"i": 1}], gpus=1)])
    for record in records:
        assert not record.prestarted
        assert record.gate_wait_s is None
        assert record.gate_to_work_s is not None
        assert record.gate_to_work_s >= PREPARE_S  # prepared after it got the GPU


async def test_below_the_memory_reserve_a_run_waits_to_start_instead_of_preparing(
    prepared_module: Path, tmp_path: Path
) -> None:
    pool = GpuPool.virtual_devices(1, cooldown_s=COOLDOWN_S)
    runner = LocalRunner(function="prep:run", cwd=prepared_module, exchange_base=tmp_path)
    available = [10 * 2**30]  # the host has 10 GiB available, then 1 GiB
    reserve = MemoryReserve(4 * 2**30, available=lambda: available[0])
    placement = LocalPlacement(runner, pool, prestart=True, memory_reserve=reserve)
    with anyio.fail_after(30):
        async with Dispatcher(placement=placement) as d, anyio.create_task_group() as tg:
            done: list[RunRecord] = []

            async def one(i: int) -> None:
                done.append(await d.run({"i": i}, gpus=1))

            tg.start_soon(one, 0)
            await anyio.sleep(0.1)
            available[0] = 2**30
            tg.start_soon(one, 1)
    records = _by_start(done)
    held = records[1]
    assert not held.prestarted
    assert held.prestart_held == "memory"
    # It was started once the GPU was its own: it prepared after the first had exited.
    assert records[0].exited_at is not None
    assert held.result["data"]["prepare_start"] >= records[0].exited_at.timestamp()  # type: ignore[index]


def test_the_default_reserve_is_a_share_of_the_hosts_memory() -> None:
    reserve = MemoryReserve(available=lambda: 5, total=lambda: 100)
    assert reserve.reserve_bytes == 20
    assert not reserve.allows_prestart()
    assert MemoryReserve(4, available=lambda: 5).allows_prestart()
    assert MemoryReserve(4, available=lambda: None).allows_prestart()  # unknown: no limit
    assert MemoryReserve(total=lambda: None, available=lambda: 0).reserve_bytes == 0


def test_meminfo_is_read_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:       2048 kB\nMemAvailable:   1024 kB\n")
    assert meminfo_bytes("MemAvailable", path) == 1024 * 1024
    assert meminfo_bytes("Nope", path) is None
    assert meminfo_bytes("MemTotal", tmp_path / "missing") is None


async def test_a_command_run_is_held_at_the_shell_gate(tmp_path: Path) -> None:
    script = (
        '[ -z "$LLEM_GO_PATH" ] || [ -e "$LLEM_GO_PATH" ] || exit 3; '
        'echo "{\\"gated\\": \\"${LLEM_GO_PATH:+yes}\\"}" > "$LLEM_RESULT_PATH"; sleep 0.5'
    )
    runner = LocalRunner(["/bin/sh", "-c", script], exchange_base=tmp_path)
    pool = GpuPool.virtual_devices(1, cooldown_s=COOLDOWN_S)
    with anyio.fail_after(30):
        async with Dispatcher(runner, pool=pool, prestart=True) as d:
            records = [r async for r in d.map([{"i": i} for i in range(3)], gpus=1)]
    assert all(r.ok for r in records), [(r.error, r.failure) for r in records]
    prestarted = [r for r in records if r.prestarted]
    assert len(prestarted) == 2
    for record in prestarted:
        assert record.result is not None
        assert record.result["data"]["gated"] == "yes"
        assert record.gate_wait_s is not None
        assert record.gate_wait_s > 0.1  # it waited (its predecessor worked 0.5 s)
        assert record.prepare_s is None  # a command leaves no marks of its own


TEARDOWN_S = 0.6
GAP_S = 1.0


async def test_the_cooldown_counts_from_the_end_of_the_work_not_the_exit(tmp_path: Path) -> None:
    """A process that takes TEARDOWN_S to exit after its work: the cooldown overlaps it."""
    (tmp_path / "slow_exit.py").write_text(
        textwrap.dedent(
            f"""
            import atexit, time

            def run(config):
                atexit.register(time.sleep, {TEARDOWN_S})  # CUDA and interpreter teardown
                return {{"i": config["i"], "returned": time.time()}}
            """
        )
    )
    pool = GpuPool.virtual_devices(1, cooldown_s=GAP_S)
    runner = LocalRunner(function="slow_exit:run", cwd=tmp_path, exchange_base=tmp_path)
    with anyio.fail_after(60):
        async with Dispatcher(runner, pool=pool, prestart=True) as d:
            records = [r async for r in d.map([{"i": i} for i in range(3)], gpus=1)]
    assert all(r.ok for r in records), [(r.error, r.failure) for r in records]
    records.sort(key=lambda r: r.result["data"]["returned"])  # type: ignore[index]
    for prev, nxt in itertools.pairwise(records):
        assert prev.work_ended_at is not None
        assert prev.exited_at is not None
        ended, exited = prev.work_ended_at.timestamp(), prev.exited_at.timestamp()
        assert ended >= prev.result["data"]["returned"]  # type: ignore[index]
        assert exited - ended >= TEARDOWN_S
        assert nxt.gate_opened_at is not None
        gate = nxt.gate_opened_at.timestamp()
        assert gate >= exited  # never while the previous process holds the GPU
        assert gate >= ended + GAP_S - 0.005  # the whole cooldown, from the work's end
        # Counted from the exit it would open no earlier than exited + GAP_S.
        assert gate < exited + GAP_S - TEARDOWN_S / 2
