"""The thermal gate on a fake sensor and a clock the test controls (trio's MockClock).

Time only moves when every task sleeps, and jumps straight to the next deadline,
so a 120 s settle limit takes microseconds and its figures are exact.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs
from trio.testing import MockClock

from llem_dispatch.gpu import GpuPool, SettleSpec
from llem_dispatch.gpu.thermal import ThermalGate

IDLE = (35.0, 70.0)
HOT = (70.0, 400.0)


def run_mock(fn: Callable[[], Awaitable[Any]], clock: MockClock | None = None) -> Any:
    clock = clock or MockClock(autojump_threshold=0)
    return anyio.run(fn, backend="trio", backend_options={"clock": clock})


class CoolingGpu:
    """Idle until the test heats it; then cools back to idle `cool_s` after it is freed.

    The pool reads sensors on a worker thread, where there is no event loop to
    ask the time: the sensor reads the run's MockClock itself (`run_mock(main,
    gpu.clock)`).
    """

    def __init__(self, cool_s: float) -> None:
        self.cool_s = cool_s
        self.idle_at = -math.inf
        self.reads = 0
        self.clock = MockClock(autojump_threshold=0)

    def heat_until_freed_at(self, freed_at: float) -> None:
        self.idle_at = freed_at + self.cool_s

    def __call__(self, device_id: str) -> tuple[float, float]:
        self.reads += 1
        return IDLE if self.clock.current_time() >= self.idle_at else HOT


def test_spec_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_s"):
        SettleSpec(min_s=10, max_s=5)
    with pytest.raises(ValueError, match="sample_s"):
        SettleSpec(sample_s=0)


def test_gate_waits_min_s_then_for_a_calm_hold() -> None:
    readings = {"t": HOT}
    gate = ThermalGate(
        SettleSpec(min_s=5, hold_s=3, max_s=120, sample_s=1, baselines={"0": IDLE}),
        lambda d: readings["t"],
    )
    gate.released("0")
    assert not gate.ready("0", 0.0, 4.9)  # min_s not over
    assert not gate.ready("0", 0.0, 6.0)  # hot
    readings["t"] = (IDLE[0] + 2, IDLE[1] + 9)  # within 3 C and 10 W
    assert not gate.ready("0", 0.0, 7.0)  # calm since 7, not yet for 3 s
    assert not gate.ready("0", 0.0, 9.0)
    assert gate.ready("0", 0.0, 10.0)
    report = gate.hand_on("0", 0.0, 10.0)
    assert report.settled
    assert report.waited_s == 10.0
    assert (report.temperature_c, report.power_w) == (IDLE[0] + 2, IDLE[1] + 9)


def test_a_hot_reading_restarts_the_hold() -> None:
    readings = {"t": IDLE}
    gate = ThermalGate(
        SettleSpec(min_s=0, hold_s=3, sample_s=1, baselines={"0": IDLE}), lambda d: readings["t"]
    )
    gate.released("0")
    assert not gate.ready("0", 0.0, 1.0)
    readings["t"] = HOT
    assert not gate.ready("0", 0.0, 2.0)
    readings["t"] = IDLE
    assert not gate.ready("0", 0.0, 3.0)
    assert not gate.ready("0", 0.0, 5.0)
    assert gate.ready("0", 0.0, 6.0)


def test_a_gpu_that_never_settles_is_handed_on_at_max_s_and_says_so() -> None:
    gate = ThermalGate(SettleSpec(min_s=5, max_s=60, baselines={"0": IDLE}), lambda d: HOT)
    gate.released("0")
    assert not gate.ready("0", 0.0, 59.9)
    assert gate.ready("0", 0.0, 60.0)
    report = gate.hand_on("0", 0.0, 60.0)
    assert not report.settled
    assert report.waited_s == 60.0


def test_first_use_measures_the_baseline() -> None:
    gate = ThermalGate(SettleSpec(), lambda d: (41.0, 80.0))
    assert gate.baseline("0") is None
    report = gate.hand_on("0", None, 0.0)
    assert gate.baseline("0") == (41.0, 80.0)
    assert report.settled
    assert report.waited_s is None


def test_sampling_is_rate_limited() -> None:
    calls: list[str] = []
    gate = ThermalGate(SettleSpec(sample_s=1), lambda d: calls.append(d) or IDLE)
    for t in (0.0, 0.2, 0.5, 0.99, 1.0, 1.5, 2.0):
        gate.sample("0", t)
    assert len(calls) == 3


def _pool(sensor: Callable[[str], tuple[float, float]], **spec: Any) -> GpuPool:
    return GpuPool(
        ["0"], settle=SettleSpec(**{"min_s": 5, "hold_s": 3, "max_s": 120, **spec}), sensor=sensor
    )


def test_pool_hands_a_gpu_on_once_settled_not_after_a_fixed_gap() -> None:
    gpu = CoolingGpu(cool_s=12)
    pool = _pool(gpu)

    async def main() -> tuple[float, Any]:
        async with pool.acquire(1):
            await anyio.sleep(30)
            gpu.heat_until_freed_at(anyio.current_time())
        freed = anyio.current_time()
        async with pool.acquire(1) as lease:
            return anyio.current_time() - freed, lease.settle["0"]

    waited, report = run_mock(main, gpu.clock)
    # Cools 12 s after release, then must read calm for 3 s (samples every 0.5 s).
    assert 15.0 <= waited <= 15.5
    assert report.settled
    assert report.waited_s == pytest.approx(waited)
    assert (report.temperature_c, report.power_w) == IDLE


def test_pool_never_settling_gpu_goes_on_at_max_s() -> None:
    gpu = CoolingGpu(cool_s=math.inf)
    pool = _pool(gpu, max_s=40)

    async def main() -> tuple[float, Any]:
        async with pool.acquire(1):
            gpu.heat_until_freed_at(anyio.current_time())
        freed = anyio.current_time()
        async with pool.acquire(1) as lease:
            return anyio.current_time() - freed, lease.settle["0"]

    waited, report = run_mock(main, gpu.clock)
    assert waited == pytest.approx(40.0)
    assert not report.settled
    assert report.temperature_c == HOT[0]


def test_pool_min_s_holds_even_a_cool_gpu() -> None:
    gpu = CoolingGpu(cool_s=0)
    pool = _pool(gpu, min_s=5, hold_s=0)

    async def main() -> float:
        async with pool.acquire(1):
            gpu.heat_until_freed_at(anyio.current_time())
        freed = anyio.current_time()
        async with pool.acquire(1):
            return anyio.current_time() - freed

    assert run_mock(main, gpu.clock) == pytest.approx(5.0)


def test_pool_samples_only_while_settling_and_waited_for() -> None:
    gpu = CoolingGpu(cool_s=10)
    pool = _pool(gpu, sample_s=1)

    async def main() -> None:
        async with pool.acquire(1):
            await anyio.sleep(1000)  # held: nothing to sample
            gpu.heat_until_freed_at(anyio.current_time())
        async with pool.acquire(1):
            pass

    run_mock(main, gpu.clock)
    # First use, hand-on, then about one read a second over 10 s of cooling + hold.
    assert gpu.reads < 25


def test_settle_is_ignored_on_virtual_gpus_and_said_once() -> None:
    with capture_logs() as logs:
        pool = GpuPool.virtual_devices(2, settle=SettleSpec())

    async def main() -> float:
        async with pool.acquire(2):
            pass
        start = anyio.current_time()
        async with pool.acquire(2) as lease:
            assert lease.settle == {}
            return anyio.current_time() - start

    assert run_mock(main) == 0.0
    assert [e["event"] for e in logs].count("gpu_settle_ignored") == 1


def test_records_carry_uuid_model_and_state_at_start() -> None:
    from llem_dispatch.dispatch import Dispatcher
    from llem_dispatch.testing import FakeRunner

    gpu = CoolingGpu(cool_s=4)
    pool = GpuPool(["0"], settle=SettleSpec(min_s=1, hold_s=1, max_s=60), sensor=gpu)
    pool.uuids = {"0": "GPU-1234"}
    pool.names = {"0": "NVIDIA H200"}

    def heat(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        gpu.heat_until_freed_at(anyio.current_time())
        return {"ok": 1}

    async def main() -> list[Any]:
        async with Dispatcher(FakeRunner(heat), pool=pool) as dispatcher:
            return [await dispatcher.run({"i": i}, gpus=1) for i in range(2)]

    first, second = run_mock(main, gpu.clock)
    assert (first.gpu_uuids, first.gpu_name) == (["GPU-1234"], "NVIDIA H200")
    start = second.gpus_at_start[0]
    assert (start.id, start.uuid, start.name) == ("0", "GPU-1234", "NVIDIA H200")
    assert (start.temperature_c, start.power_w) == IDLE
    assert start.settled
    assert start.settle_wait_s == pytest.approx(5.0, abs=0.6)
    assert first.gpus_at_start[0].settle_wait_s is None  # first use


def test_virtual_gpus_record_no_uuid_or_state() -> None:
    from llem_dispatch.dispatch import Dispatcher
    from llem_dispatch.testing import FakeRunner

    async def main() -> Any:
        async with Dispatcher(FakeRunner(), pool=GpuPool.virtual_devices(1)) as dispatcher:
            return await dispatcher.run({"i": 1}, gpus=1)

    record = anyio.run(main)
    assert record.gpu_ids == ["0"]
    assert (record.gpu_uuids, record.gpu_name, record.gpus_at_start) == ([], None, [])


def test_pool_a_gpu_calm_early_goes_on_at_min_s_not_min_plus_hold() -> None:
    gpu = CoolingGpu(cool_s=1)
    pool = _pool(gpu, min_s=5, hold_s=3)

    async def main() -> float:
        async with pool.acquire(1):
            gpu.heat_until_freed_at(anyio.current_time())
        freed = anyio.current_time()
        async with pool.acquire(1):
            return anyio.current_time() - freed

    # Calm from 1 s on, sampled while waiting: by 5 s it has been calm for 4 s.
    assert run_mock(main, gpu.clock) == pytest.approx(5.0)


def test_pool_opens_a_prestarted_gate_only_once_its_gpu_settled() -> None:
    gpu = CoolingGpu(cool_s=12)
    pool = _pool(gpu)

    async def main() -> tuple[float, Any]:
        async with anyio.create_task_group() as tg:
            result: list[tuple[float, Any]] = []
            freed: list[float] = []

            async def first() -> None:
                async with pool.acquire(1):
                    await anyio.sleep(30)
                    gpu.heat_until_freed_at(anyio.current_time())
                freed.append(anyio.current_time())

            async def successor() -> None:
                async with pool.acquire(1, early=True) as lease:
                    assert lease.pending
                    await lease.wait_ready()
                    result.append((anyio.current_time() - freed[0], lease.settle["0"]))

            tg.start_soon(first)
            await anyio.sleep(1)
            tg.start_soon(successor)
        return result[0]

    waited, report = run_mock(main, gpu.clock)
    # As for a plain acquire: cools 12 s, then reads calm for 3 s.
    assert 15.0 <= waited <= 15.5
    assert report.settled
