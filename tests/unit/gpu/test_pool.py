"""GpuPool: distinct ids, immediate errors, cooldown, fair queueing, memory check, detection."""

from __future__ import annotations

import itertools
import sys
import threading
import types
from collections.abc import Callable
from contextlib import AsyncExitStack

import anyio
import pytest
from structlog.testing import capture_logs

from llem_dispatch.errors import ConfigError, GpuRequestError
from llem_dispatch.gpu import GpuLease, GpuPool, SettleSpec
from llem_dispatch.gpu import pool as pool_module

ALL4 = ("0", "1", "2", "3")


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait, bounded, until `predicate` holds (it reads pool state other tasks change)."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.001)


# -- ids and immediate answers ------------------------------------------------


async def test_acquire_hands_out_distinct_ids_never_shared() -> None:
    pool = GpuPool.virtual_devices(4)
    in_use: set[str] = set()
    grants = 0

    async def worker(k: int) -> None:
        nonlocal grants
        for _ in range(15):
            async with pool.acquire(k) as ids:
                assert isinstance(ids, GpuLease)
                assert len(ids) == k
                assert len(set(ids)) == k
                assert set(ids) <= set(ALL4)
                assert not in_use & set(ids), f"{ids} already held"
                in_use.update(ids)
                grants += 1
                await anyio.sleep(0)
                await anyio.sleep(0)
                in_use.difference_update(ids)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for k in (1, 1, 2, 3, 4, 1, 2, 1):
                tg.start_soon(worker, k)
    assert grants == 8 * 15
    assert pool.free_ids() == ALL4
    assert pool.busy() == {}
    assert pool.waiting() == ()


async def test_zero_gpus_is_an_empty_lease_at_once() -> None:
    for pool in (GpuPool([]), GpuPool.virtual_devices(1)):
        with anyio.fail_after(1):
            async with AsyncExitStack() as stack:
                # Even with every GPU held, a CPU-only request does not wait.
                if pool.size:
                    await stack.enter_async_context(pool.acquire(pool.size))
                async with pool.acquire(0) as ids:
                    assert ids == ()
                    assert isinstance(ids, GpuLease)


async def test_negative_count_is_a_value_error() -> None:
    pool = GpuPool.virtual_devices(2)
    with pytest.raises(ValueError, match=">= 0"):
        pool.acquire(-1)


async def test_more_than_the_pool_fails_when_asked_not_after_a_wait() -> None:
    pool = GpuPool.virtual_devices(4)
    with pytest.raises(GpuRequestError) as info:
        pool.acquire(5)  # raised by the call itself: nothing to await, nothing hangs
    assert "asked for 5 GPUs" in info.value.message
    assert "only 4" in info.value.message
    assert isinstance(info.value, ValueError)
    with pytest.raises(GpuRequestError):
        pool.check_request(5)
    pool.check_request(4)


async def test_empty_pool_says_no_gpus_found_and_suggests_virtual_ones() -> None:
    pool = GpuPool([])
    with pytest.raises(GpuRequestError) as info:
        pool.acquire(1)
    assert "no GPUs were found" in info.value.message
    assert "--virtual-gpus N" in info.value.fix_suggestion
    assert "GpuPool.virtual_devices(n)" in info.value.fix_suggestion


def test_constructor_normalises_ids_and_rejects_bad_options() -> None:
    pool = GpuPool([0, "1", " GPU-abc "], cooldown_s=1.5)
    assert pool.devices == ("0", "1", "GPU-abc")
    assert pool.size == 3
    assert not pool.virtual
    assert pool.cooldown_s == 1.5
    assert pool.uuids == {}
    virtual = GpuPool.virtual_devices(3, cooldown_s=0.5)
    assert virtual.devices == ("0", "1", "2")
    assert virtual.virtual
    assert virtual.cooldown_s == 0.5
    for bad in (
        lambda: GpuPool(["0", "0"]),
        lambda: GpuPool([""]),
        lambda: GpuPool(["0"], cooldown_s=-1),
        lambda: GpuPool(["0"], max_backfill=-1),
        lambda: GpuPool.virtual_devices(-1),
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - ConfigError is a ValueError
            bad()


# -- release ------------------------------------------------------------------


async def test_exception_in_the_block_releases() -> None:
    pool = GpuPool.virtual_devices(2)

    async def fail_inside() -> None:
        async with pool.acquire(2) as ids:
            leases.append(ids)
            assert pool.busy().keys() == {"0", "1"}
            raise RuntimeError("boom")

    leases: list[GpuLease] = []
    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside()
    (ids,) = leases
    assert ids.released
    assert pool.free_ids() == ("0", "1")
    assert pool.busy() == {}


async def test_cancellation_in_the_block_releases() -> None:
    pool = GpuPool.virtual_devices(2)
    with anyio.fail_after(1), anyio.CancelScope() as scope:
        async with pool.acquire(2):
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert pool.free_ids() == ("0", "1")


async def test_early_release_frees_now_and_is_idempotent() -> None:
    pool = GpuPool.virtual_devices(1, cooldown_s=0.0)
    assert pool.last_released("0") is None
    with anyio.fail_after(1):
        async with pool.acquire(1, holder="cfg-a") as lease:
            assert pool.busy()["0"].holder == "cfg-a"
            assert pool.busy()["0"].lease_ids == ("0",)
            assert not lease.released
            lease.release()
            released_at = pool.last_released("0")
            assert lease.released
            assert released_at is not None
            assert released_at <= anyio.current_time()
            assert pool.busy() == {}
            # Someone else can have the GPU while this block is still open.
            async with pool.acquire(1) as other:
                assert other == ("0",)
            after_other = pool.last_released("0")
            assert after_other is not None
            assert after_other >= released_at
            lease.release()
        # Neither the second call nor leaving the block released "0" again.
        assert pool.last_released("0") == after_other
        assert pool.free_ids() == ("0",)


async def test_cancelled_waiter_leaves_nothing_behind() -> None:
    # max_backfill=0: the 1-GPU request behind may only run once the head is gone.
    pool = GpuPool.virtual_devices(2, max_backfill=0)
    got: list[tuple[str, ...]] = []

    async def small() -> None:
        async with pool.acquire(1) as ids:
            got.append(ids)

    with anyio.fail_after(2):
        async with pool.acquire(1) as held, anyio.create_task_group() as tg:
            head = anyio.CancelScope()

            async def big() -> None:
                with head:
                    async with pool.acquire(2):
                        pytest.fail("the cancelled waiter was served")

            tg.start_soon(big)
            await until(lambda: pool.waiting() == (2,))
            tg.start_soon(small)
            await until(lambda: pool.waiting() == (2, 1))
            assert got == []  # held back behind the head
            head.cancel()
            await until(lambda: bool(got))
            assert got == [("1",)]
            assert held == ("0",)
    assert pool.waiting() == ()
    assert pool.busy() == {}
    assert pool.free_ids() == ("0", "1")


async def test_waiter_cancelled_as_it_is_granted_gives_the_ids_back() -> None:
    pool = GpuPool.virtual_devices(2)
    with anyio.fail_after(2):
        holder = AsyncExitStack()
        first = await holder.enter_async_context(pool.acquire(2))
        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                with scope:
                    async with pool.acquire(2):
                        pytest.fail("the cancelled waiter ran its block")

            tg.start_soon(waiter)
            await until(lambda: pool.waiting() == (2,))
            first.release()  # grants to the waiter synchronously...
            released_at = pool.last_released("0")
            scope.cancel()  # ...which is cancelled before it ever runs
        await holder.aclose()  # `first` is released already: a no-op
    assert pool.waiting() == ()
    assert pool.busy() == {}
    assert pool.free_ids() == ("0", "1")
    # The revoked grant was never used, so it started no new cooldown.
    assert pool.last_released("0") == released_at


# -- cooldown and order -------------------------------------------------------


async def test_released_id_comes_back_only_after_its_cooldown() -> None:
    cooldown = 0.2
    pool = GpuPool.virtual_devices(2, cooldown_s=cooldown)
    with anyio.fail_after(3):
        async with pool.acquire(2):
            pass
        released_at = pool.last_released("0")
        assert released_at is not None
        assert pool.free_ids() == ()
        async with pool.acquire(1) as ids:
            granted_at = anyio.current_time()
    assert ids == ("0",)  # both cooled at the same instant: lowest first
    assert granted_at - released_at >= cooldown
    assert granted_at - released_at < cooldown + 1.0


async def test_cooldown_of_one_gpu_does_not_hold_up_another() -> None:
    pool = GpuPool.virtual_devices(2, cooldown_s=60.0)
    with anyio.fail_after(1):
        async with pool.acquire(1) as first:
            pass
        async with pool.acquire(1) as second:
            pass
    assert (first, second) == (("0",), ("1",))
    assert pool.free_ids() == ()


async def test_order_is_lowest_first_then_longest_free() -> None:
    pool = GpuPool.virtual_devices(4)
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(pool.acquire(1))
        b = await stack.enter_async_context(pool.acquire(1))
        assert (a, b) == (("0",), ("1",))
        a.release()
        b.release()
    # Never-used GPUs first, then the one idle the longest; the lease lists
    # its ids in pool order.
    async with pool.acquire(3) as three:
        assert three == ("0", "2", "3")
    async with pool.acquire(1) as longest_idle, pool.acquire(1) as tie:
        assert longest_idle == ("1",)
        assert tie == ("0",)  # "0", "2", "3" were released together: lowest first


async def test_queued_waiters_are_served_one_cooldown_apart_without_a_release() -> None:
    # Only the head of the queue keeps time for cooldowns; each new head must
    # take over, or the waiters behind it would sleep forever.
    cooldown = 0.05
    pool = GpuPool.virtual_devices(1, cooldown_s=cooldown)
    granted: list[float] = []

    async def job() -> None:
        async with pool.acquire(1):
            granted.append(anyio.current_time())

    with anyio.fail_after(2):
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            await stack.enter_async_context(pool.acquire(1))
            for _ in range(3):
                tg.start_soon(job)
            await until(lambda: pool.waiting() == (1, 1, 1))
            await stack.aclose()
            released_at = pool.last_released("0")
    assert released_at is not None
    assert len(granted) == 3
    gaps = [b - a for a, b in itertools.pairwise([released_at, *granted])]
    assert all(gap >= cooldown for gap in gaps), gaps


async def test_cooldown_end_backfills_a_waiter_behind_a_blocked_head() -> None:
    # Nobody releases when "1" cools down: the blocked head wakes for it and
    # hands "1" to the 1-GPU request queued behind it.
    pool = GpuPool.virtual_devices(2, cooldown_s=0.05)
    with anyio.fail_after(2):
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            await stack.enter_async_context(pool.acquire(1))
            (await stack.enter_async_context(pool.acquire(1))).release()
            assert pool.free_ids() == ()
            big_ids: list[tuple[str, ...]] = []
            small_ids: list[tuple[str, ...]] = []

            async def big() -> None:
                async with pool.acquire(2) as ids:
                    big_ids.append(ids)

            async def small() -> None:
                async with pool.acquire(1) as ids:
                    small_ids.append(ids)
                    await anyio.sleep_forever()

            tg.start_soon(big)
            await until(lambda: pool.waiting() == (2,))
            tg.start_soon(small)
            await until(lambda: bool(small_ids))
            assert small_ids == [("1",)]
            assert pool.waiting() == (2,)
            tg.cancel_scope.cancel()
    assert big_ids == []
    assert pool.waiting() == ()


async def test_a_cancelled_head_hands_the_cooldown_timer_on() -> None:
    pool = GpuPool.virtual_devices(1, cooldown_s=0.05)
    got: list[tuple[str, ...]] = []
    with anyio.fail_after(2):
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            held = await stack.enter_async_context(pool.acquire(1))
            head = anyio.CancelScope()

            async def first() -> None:
                with head:
                    async with pool.acquire(1):
                        pytest.fail("the cancelled waiter was served")

            async def second() -> None:
                async with pool.acquire(1) as ids:
                    got.append(ids)

            tg.start_soon(first)
            await until(lambda: pool.waiting() == (1,))
            tg.start_soon(second)
            await until(lambda: pool.waiting() == (1, 1))
            held.release()  # "0" cools down; the head sleeps until it has
            await anyio.sleep(0.01)
            head.cancel()
            await until(lambda: bool(got))
    assert got == [("0",)]
    assert pool.waiting() == ()


async def test_a_release_wakes_only_the_waiters_it_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    # With one event shared by the whole queue, every release woke every
    # waiter: N queued requests cost O(N^2) wake-ups. Count them, whatever
    # event the pool waits on, instead of timing the run.
    n = 500
    bound = 5 * n
    wakeups = 0
    run = anyio.CancelScope()
    real_event = anyio.Event

    class CountingEvent:
        def __init__(self) -> None:
            self._event = real_event()

        def set(self) -> None:
            self._event.set()

        def is_set(self) -> bool:
            return self._event.is_set()

        async def wait(self) -> None:
            nonlocal wakeups
            try:
                await self._event.wait()
            finally:
                wakeups += 1
                if wakeups >= bound:
                    run.cancel()  # quadratic: no need to sit through the rest

    monkeypatch.setattr(anyio, "Event", CountingEvent)
    pool = GpuPool.virtual_devices(2)
    served: list[int] = []

    async def job(i: int) -> None:
        async with pool.acquire(1):
            served.append(i)
            # Hold the GPU for one scheduling step, so releases come one
            # after another (as runs end) rather than all in the same step.
            await anyio.sleep(0)

    with anyio.fail_after(4), run:
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            await stack.enter_async_context(pool.acquire(2))
            for i in range(n):
                tg.start_soon(job, i)
            await until(lambda: len(pool.waiting()) == n)
            await stack.aclose()
    assert n <= wakeups < bound
    assert sorted(served) == list(range(n))
    assert pool.waiting() == ()
    assert pool.busy() == {}


# -- fairness -----------------------------------------------------------------


async def _stream_of_small_jobs_then_big(pool: GpuPool, give_up_after: int) -> tuple[int, bool]:
    """8 workers loop on 1-GPU jobs, then one 4-GPU request joins the queue.

    Returns how many 1-GPU requests queued after it were served before it (its
    jumps), and whether it was served at all before `give_up_after` jumps.
    """
    tickets = itertools.count()
    big_ticket: int | None = None
    big_started = False
    jumps = 0
    grants = 0
    stop = anyio.Event()

    async def small() -> None:
        nonlocal grants, jumps
        while not stop.is_set():
            # Nothing yields between taking a ticket and joining the pool's queue.
            ticket = next(tickets)
            async with pool.acquire(1):
                grants += 1
                # It holds a GPU, so the 4-GPU request cannot have been served
                # yet: if it queued later and got here first, it jumped.
                if big_ticket is not None and ticket > big_ticket and not big_started:
                    jumps += 1
                await anyio.sleep(0.002)

    async def big() -> None:
        nonlocal big_ticket, big_started
        big_ticket = next(tickets)
        async with pool.acquire(4) as ids:
            big_started = True
            assert ids == ALL4
        stop.set()

    with anyio.fail_after(4):
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(small)
            await until(lambda: grants >= 20)  # the stream is flowing
            tg.start_soon(big)
            await until(lambda: big_started or jumps >= give_up_after)
            stop.set()
            tg.cancel_scope.cancel()
    return jumps, big_started


async def test_multi_gpu_request_is_not_starved_by_a_stream_of_single_ones() -> None:
    pool = GpuPool.virtual_devices(4)  # max_backfill defaults to the pool size, 4
    jumps, served = await _stream_of_small_jobs_then_big(pool, give_up_after=200)
    assert served
    assert jumps <= 4


async def test_without_a_backfill_bound_the_multi_gpu_request_would_starve() -> None:
    # The control for the test above: unbounded backfill lets the stream win.
    pool = GpuPool.virtual_devices(4, max_backfill=10**9)
    jumps, served = await _stream_of_small_jobs_then_big(pool, give_up_after=100)
    assert not served
    assert jumps >= 100


async def test_strict_fifo_when_backfill_is_off() -> None:
    pool = GpuPool.virtual_devices(4, max_backfill=0)
    jumps, served = await _stream_of_small_jobs_then_big(pool, give_up_after=200)
    assert served
    assert jumps == 0


async def test_small_request_backfills_past_a_blocked_head_up_to_the_bound() -> None:
    pool = GpuPool.virtual_devices(4, max_backfill=2)
    with anyio.fail_after(2):
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            await stack.enter_async_context(pool.acquire(1))
            big_ids: list[tuple[str, ...]] = []

            async def big() -> None:
                async with pool.acquire(4) as ids:
                    big_ids.append(ids)

            tg.start_soon(big)
            await until(lambda: pool.waiting() == (4,))
            # Two 1-GPU requests jump the blocked head at once...
            one = await stack.enter_async_context(pool.acquire(1))
            two = await stack.enter_async_context(pool.acquire(1))
            assert (one, two) == (("1",), ("2",))
            # ...the third may not: the last free GPU is kept for the head.
            third: list[tuple[str, ...]] = []

            async def small() -> None:
                async with pool.acquire(1) as ids:
                    third.append(ids)

            tg.start_soon(small)
            await until(lambda: pool.waiting() == (4, 1))
            assert pool.free_ids() == ("3",)
            await stack.aclose()  # the three 1-GPU leases end
            await until(lambda: bool(big_ids) and bool(third))
    assert big_ids == [ALL4]  # the head came first, then the one behind it
    assert pool.free_ids() == ALL4


# -- residual memory check ----------------------------------------------------


async def test_busy_memory_waits_until_the_device_is_clean() -> None:
    used: dict[str, float | None] = {"0": 5000.0, "1": None}
    probed: list[str] = []

    def probe(device_id: str) -> float | None:
        probed.append(device_id)
        return used[device_id]

    pool = GpuPool(["0", "1"], residual_memory_mb=100, memory_probe=probe, memory_poll_s=0.05)
    with anyio.fail_after(2), capture_logs() as logs:
        async with pool.acquire(1) as ids:
            assert ids == ("1",)  # "0" is busy; None (unknown) counts as clean
        got: list[tuple[str, ...]] = []

        async def both() -> None:
            async with pool.acquire(2) as lease:
                got.append(lease)

        async with anyio.create_task_group() as tg:
            tg.start_soon(both)
            checks = probed.count("0")
            await until(lambda: probed.count("0") >= checks + 2)  # re-checked while waiting
            assert got == []
            used["0"] = 50.0
            await until(lambda: bool(got))
    assert got == [("0", "1")]
    waits = [e for e in logs if e["event"] == "gpu_memory_in_use"]
    assert len(waits) == 1  # one warning per busy spell, not one per poll
    assert waits[0]["log_level"] == "warning"
    assert waits[0]["device"] == "0"


async def test_busy_memory_with_warn_hands_the_gpu_out_and_logs() -> None:
    pool = GpuPool(["0"], residual_memory_mb=100, on_busy_memory="warn", memory_probe=lambda _: 900)
    with anyio.fail_after(1), capture_logs() as logs:
        async with pool.acquire(1) as ids:
            assert ids == ("0",)
    assert [e["log_level"] for e in logs if e["event"] == "gpu_memory_in_use"] == ["warning"]


async def test_memory_check_is_off_for_virtual_pools_and_survives_a_broken_probe() -> None:
    def never(_: str) -> float:
        raise AssertionError("a virtual pool must not probe")

    pool = GpuPool.virtual_devices(1, residual_memory_mb=1, memory_probe=never)
    async with pool.acquire(1) as ids:
        assert ids == ("0",)

    def broken(_: str) -> float:
        raise OSError("driver gone")

    real = GpuPool(["0"], residual_memory_mb=1, memory_probe=broken)
    with anyio.fail_after(1), capture_logs() as logs:
        async with real.acquire(1) as ids:
            assert ids == ("0",)
    assert any(e["event"] == "gpu_memory_probe_failed" for e in logs)


@pytest.mark.parametrize("probe", ["memory", "thermal"])
async def test_probes_run_on_a_worker_thread_and_never_stall_the_event_loop(probe: str) -> None:
    # A hung driver call blocks its worker thread, not the loop: the loop keeps
    # running and is the one that lets the probe go.
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    let_go = threading.Event()
    freed_by_loop: list[bool] = []

    def hang(device_id: str) -> tuple[float, float]:
        threads.add(threading.get_ident())
        freed_by_loop.append(let_go.wait(2.0))
        return (35.0, 70.0)

    if probe == "memory":
        pool = GpuPool(["0"], residual_memory_mb=100, memory_probe=lambda d: hang(d)[0])
    else:
        pool = GpuPool(["0"], settle=SettleSpec(), sensor=hang)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0)

    async def free_the_probe() -> None:
        await until(lambda: bool(threads) and ticks > 100)
        let_go.set()

    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            tg.start_soon(free_the_probe)
            async with pool.acquire(1) as ids:
                assert ids == ("0",)
            tg.cancel_scope.cancel()
    assert freed_by_loop
    assert all(freed_by_loop)
    assert loop_thread not in threads


async def test_a_waiter_cancelled_while_its_ids_are_sensed_leaves_nothing_behind() -> None:
    let_go = threading.Event()
    sensing = threading.Event()

    def slow(device_id: str) -> float:
        sensing.set()
        let_go.wait(2.0)
        return 0.0

    pool = GpuPool(["0", "1"], residual_memory_mb=100, memory_probe=slow)
    with anyio.fail_after(3):
        async with anyio.create_task_group() as tg:
            scope = anyio.CancelScope()

            async def waiter() -> None:
                with scope:
                    async with pool.acquire(1):
                        pytest.fail("the cancelled waiter ran its block")

            tg.start_soon(waiter)
            await until(sensing.is_set)
            scope.cancel()  # takes effect once the read in flight returns
            let_go.set()
    assert scope.cancelled_caught
    assert pool.waiting() == ()
    assert pool.busy() == {}
    assert pool.free_ids() == ("0", "1")
    assert pool.last_released("0") is None  # never used: no cooldown started


# -- detection ----------------------------------------------------------------


def _fake_nvml(uuids: list[str], *, init_error: Exception | None = None) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")

    def init() -> None:
        if init_error is not None:
            raise init_error

    nvml.nvmlInit = init  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetCount = lambda: len(uuids)  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    # Older releases return bytes; the pool must decode them.
    nvml.nvmlDeviceGetUUID = lambda h: uuids[h].encode()  # type: ignore[attr-defined]
    return nvml


def test_detect_without_nvml_reads_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    cases = {
        "0,2": ("0", "2"),
        "GPU-aaa, MIG-bbb": ("GPU-aaa", "MIG-bbb"),
        "": (),
        "-1": (),
    }
    for value, expected in cases.items():
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        with capture_logs() as logs:
            pool = GpuPool.detect(cooldown_s=2.0)
        assert pool.devices == expected
        assert pool.uuids == {}
        assert not pool.virtual
        assert pool.cooldown_s == 2.0
        reasons = [e["reason"] for e in logs if e["event"] == "gpu_nvml_unavailable"]
        assert reasons
        assert "pynvml is not installed" in reasons[0]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert GpuPool.detect().devices == ()


def test_detect_with_nvml_uses_indices_and_records_uuids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(["GPU-aaa", "GPU-bbb", "GPU-ccc"]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pool = GpuPool.detect()
    assert pool.devices == ("0", "1", "2")
    assert pool.uuids == {"0": "GPU-aaa", "1": "GPU-bbb", "2": "GPU-ccc"}
    # A set CUDA_VISIBLE_DEVICES narrows what NVML found, by index or UUID.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-ccc,0")
    narrowed = GpuPool.detect()
    assert narrowed.devices == ("2", "0")
    assert narrowed.uuids == {"2": "GPU-ccc", "0": "GPU-aaa"}
    # An index with no device is dropped (as CUDA does); an unknown MIG UUID is kept.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,7,MIG-xyz")
    assert GpuPool.detect().devices == ("1", "MIG-xyz")


def test_detect_survives_a_broken_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = _fake_nvml(["GPU-aaa"], init_error=RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED"))
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with capture_logs() as logs:
        pool = GpuPool.detect()
    assert pool.devices == ("1",)
    reasons = [e["reason"] for e in logs if e["event"] == "gpu_nvml_unavailable"]
    assert "DRIVER_NOT_LOADED" in reasons[0]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert GpuPool.detect().devices == ()


def test_named_pool_hands_gpus_over_by_uuid_where_known(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NVML: a UUID is kept as given; an index stays unresolved."""
    monkeypatch.setattr(pool_module, "nvml_inventory", lambda: (None, "no NVML here"))
    uuid = "GPU-5e1f0a00-0000-4000-8000-000000000000"
    pool = GpuPool.named([uuid, "3"])
    assert pool.uuids == {uuid: uuid}
    assert pool.handed([uuid, "3"]) == (uuid, "3")
    assert pool.devices == (uuid, "3")


def test_named_pool_resolves_indices_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """With NVML's inventory: indices become UUIDs; a GPU the host lacks is refused."""
    inventory = [
        ("0", "GPU-aaaaaaaa-0000-4000-8000-000000000000"),
        ("1", "GPU-bbbbbbbb-0000-4000-8000-000000000001"),
    ]
    monkeypatch.setattr(pool_module, "nvml_inventory", lambda: (inventory, "ok"))
    monkeypatch.setattr(pool_module, "nvml_names", lambda ids: dict.fromkeys(ids, "NVIDIA H200"))
    pool = GpuPool.named(["1", "GPU-aaaaaaaa-0000-4000-8000-000000000000"])
    assert pool.handed(pool.devices) == (inventory[1][1], inventory[0][1])
    assert set(pool.names.values()) == {"NVIDIA H200"}
    with pytest.raises(ConfigError, match="gpus: 7 is not a GPU of this host"):
        GpuPool.named(["7"])
