"""GpuPool early requests: a pending lease promised a running lease's ids (prestart)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import anyio
import pytest

from llem_dispatch.gpu import GpuPool


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.001)


async def test_early_request_is_promised_the_running_lease_and_ready_after_its_cooldown() -> None:
    pool = GpuPool.virtual_devices(1, cooldown_s=0.05)
    with anyio.fail_after(2):
        async with pool.acquire(1) as first:
            assert not first.pending
            async with pool.acquire(1, early=True) as second:
                assert second.pending
                assert tuple(second) == tuple(first)
                ready_at: list[float] = []

                async def wait() -> None:
                    await second.wait_ready()
                    ready_at.append(anyio.current_time())

                async with anyio.create_task_group() as tg:
                    tg.start_soon(wait)
                    await anyio.sleep(0.02)
                    assert not ready_at  # the first still holds it
                    first.release()
                    released = anyio.current_time()
                assert not second.pending
                assert ready_at[0] - released >= 0.05 - 1e-3
                assert pool.busy()["0"].lease_ids == ("0",)


async def test_early_request_takes_free_ids_as_a_plain_grant() -> None:
    pool = GpuPool.virtual_devices(2)
    async with pool.acquire(1, early=True) as lease:
        assert not lease.pending
        await lease.wait_ready()  # returns at once


async def test_one_successor_per_lease_and_only_of_its_size() -> None:
    pool = GpuPool.virtual_devices(3)
    with anyio.fail_after(2):
        async with pool.acquire(2) as pair, pool.acquire(1) as single:
            got: list[tuple[tuple[str, ...], bool]] = []

            async def early(k: int) -> None:
                async with pool.acquire(k, early=True) as lease:
                    got.append((tuple(lease), lease.pending))
                    await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                for k in (1, 2, 1):
                    tg.start_soon(early, k)
                    await anyio.sleep(0.01)
                assert sorted(got) == sorted([(tuple(single), True), (tuple(pair), True)])
                assert pool.waiting() == (1,)
                tg.cancel_scope.cancel()
            assert pool.waiting() == ()


async def test_a_given_up_promise_frees_the_ids_without_a_cooldown() -> None:
    pool = GpuPool.virtual_devices(1, cooldown_s=10.0)
    with anyio.fail_after(2):
        async with pool.acquire(1) as first:
            async with pool.acquire(1, early=True) as promise:
                assert promise.pending
            # The promise is gone: the next early request is promised the lease again.
            async with pool.acquire(1, early=True) as again:
                assert again.pending
            assert not first.has_successor
        assert pool.free_ids() == ()  # the first's own cooldown runs


async def test_a_cancelled_wait_ready_leaves_the_ids_free_for_others() -> None:
    pool = GpuPool.virtual_devices(1)
    with anyio.fail_after(2):
        async with pool.acquire(1) as first:
            with anyio.move_on_after(0.02):
                async with pool.acquire(1, early=True) as promise:
                    await promise.wait_ready()
        assert pool.free_ids() == ("0",)
        async with pool.acquire(1) as third:
            assert tuple(third) == tuple(first)


async def test_multi_gpu_request_is_not_starved_by_early_single_ones() -> None:
    pool = GpuPool.virtual_devices(4)
    tickets = itertools.count()
    big_ticket: int | None = None
    big_served = False
    jumps = 0
    stop = anyio.Event()

    async def small() -> None:
        nonlocal jumps
        while not stop.is_set():
            ticket = next(tickets)
            async with pool.acquire(1, early=True) as lease:
                await lease.wait_ready()
                if big_ticket is not None and ticket > big_ticket and not big_served:
                    jumps += 1
                await anyio.sleep(0.002)

    async def big() -> None:
        nonlocal big_ticket, big_served
        big_ticket = next(tickets)
        async with pool.acquire(4, early=True) as lease:
            await lease.wait_ready()
            big_served = True
        stop.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(small)
            await anyio.sleep(0.02)
            tg.start_soon(big)
    assert big_served
    assert jumps <= 4


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_past_ready_no_id_is_used_twice_and_cooldowns_hold(seed: int) -> None:
    rng = random.Random(seed)
    cooldown = 0.003
    pool = GpuPool.virtual_devices(4, cooldown_s=cooldown)
    windows: list[tuple[str, float, float]] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            k = rng.choice((1, 1, 2, 4))
            async with pool.acquire(k, early=rng.random() < 0.8) as lease:
                await anyio.sleep(rng.random() * 0.003)  # a start-up before the gate
                await lease.wait_ready()
                start = anyio.current_time()
                await anyio.sleep(rng.random() * 0.005)
                end = anyio.current_time()
                windows.extend((d, start, end) for d in lease)
                lease.release()

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(worker, 15)
    by_gpu: dict[str, list[tuple[float, float]]] = {}
    for gpu, start, end in windows:
        by_gpu.setdefault(gpu, []).append((start, end))
    assert sum(len(v) for v in by_gpu.values()) == len(windows) > 0
    for spans in by_gpu.values():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end + cooldown - 1e-6
    assert pool.busy() == {}
    assert pool.waiting() == ()
    assert pool.promised() == ()


async def test_a_promise_waits_out_busy_memory_before_it_is_ready() -> None:
    used = {"0": 0.0}
    pool = GpuPool(["0"], residual_memory_mb=100, memory_probe=used.get, memory_poll_s=0.02)
    with anyio.fail_after(2):
        async with pool.acquire(1) as first, pool.acquire(1, early=True) as second:
            assert second.pending
            used["0"] = 5000.0  # the first run leaves memory behind
            first.release()
            ready: list[bool] = []

            async def wait() -> None:
                await second.wait_ready()
                ready.append(True)

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.sleep(0.1)
                assert not ready  # held back by the memory check, re-checked meanwhile
                assert second.pending
                used["0"] = 10.0
            assert ready
            assert not second.pending
            assert pool.busy()["0"].lease_ids == ("0",)
