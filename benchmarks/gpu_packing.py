"""4. GPU packing: makespan of a mixed 1/2/4-GPU study on 8 virtual GPUs vs the lower bound.

Jobs of known duration (FakeRunner handlers that sleep) are submitted in study
order, all at once. The makespan is compared with the lower bound
max(total GPU-seconds / 8, longest job) and with two FIFO baselines run on the
same jobs: the Dispatcher over `GpuPool(max_backfill=0)` (strict FIFO inside
the pool), and a strict-FIFO allocator written here, independent of GpuPool.
Every allocator is also checked never to hand one GPU to two jobs at once.

Target: ours (the Dispatcher with the default pool) within 1.15x of the bound.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from benchmarks._common import BenchmarkError, Context, table
from llem_dispatch.dispatch import Dispatcher
from llem_dispatch.gpu import GpuPool
from llem_dispatch.testing import FakeRunner

NAME = "gpu_packing"
TITLE = "makespan of a mixed 1/2/4-GPU study on 8 virtual GPUs vs the lower bound and FIFO"
NEEDS_DOCKER = False

GPUS = 8
TARGET = 1.15
#: (GPUs per job, how many jobs) in the full study; durations drawn per job.
MIX = ((1, 30), (2, 14), (4, 6))
DURATION_RANGE = (0.1, 0.6)
SEEDS_FULL = (1, 2, 3)
SEEDS_SMOKE = (1,)
SMOKE_SCALE = 0.25


@dataclass(frozen=True, slots=True)
class Job:
    index: int
    gpus: int
    duration_s: float


def make_study(seed: int, scale: float) -> list[Job]:
    """A shuffled mix of 1-, 2- and 4-GPU jobs with uniform random durations."""
    rng = random.Random(seed)
    jobs = [
        (k, round(rng.uniform(*DURATION_RANGE) * scale, 4))
        for k, count in MIX
        for _ in range(count)
    ]
    rng.shuffle(jobs)
    return [Job(i, k, d) for i, (k, d) in enumerate(jobs)]


def lower_bound(jobs: list[Job]) -> float:
    return max(sum(j.gpus * j.duration_s for j in jobs) / GPUS, *(j.duration_s for j in jobs))


@dataclass
class Occupancy:
    """Sleeps for each job's duration and records any GPU handed to two jobs at once."""

    busy: set[str] = field(default_factory=set)
    conflicts: int = 0

    async def handler(self, config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        if len(gpus) != config["gpus"] or self.busy & set(gpus):
            self.conflicts += 1
        self.busy |= set(gpus)
        try:
            await anyio.sleep(config["duration_s"])
        finally:
            self.busy -= set(gpus)
        return {"slept": config["duration_s"]}


@dataclass(eq=False)
class _Waiter:
    k: int
    granted: anyio.Event = field(default_factory=anyio.Event)
    ids: tuple[str, ...] = ()


class StrictFifoAllocator:
    """The baseline: requests are served strictly in arrival order, never overtaken."""

    def __init__(self, n: int) -> None:
        self.free = [str(i) for i in range(n)]
        self.queue: deque[_Waiter] = deque()

    @asynccontextmanager
    async def acquire(self, k: int) -> AsyncIterator[tuple[str, ...]]:
        waiter = _Waiter(k)
        self.queue.append(waiter)
        self._grant()
        await waiter.granted.wait()
        try:
            yield waiter.ids
        finally:
            self.free += waiter.ids
            self._grant()

    def _grant(self) -> None:
        while self.queue and self.queue[0].k <= len(self.free):
            waiter = self.queue.popleft()
            waiter.ids, self.free = tuple(self.free[: waiter.k]), self.free[waiter.k :]
            waiter.granted.set()


def job_config(job: Job) -> dict[str, Any]:
    return {"bench": NAME, "job": job.index, "gpus": job.gpus, "duration_s": job.duration_s}


async def via_dispatcher(jobs: list[Job], pool: GpuPool, occupancy: Occupancy) -> float:
    async with Dispatcher(FakeRunner(occupancy.handler), pool=pool) as dispatcher:
        failures: list[str] = []

        async def one(job: Job) -> None:
            record = await dispatcher.run(job_config(job), gpus=job.gpus)
            if not record.ok:
                failures.append(f"job {job.index}: {record.status} {record.error}")

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for job in jobs:
                tg.start_soon(one, job)
        makespan = time.perf_counter() - start
    if failures:
        raise BenchmarkError("; ".join(failures))
    return makespan


async def via_fifo(jobs: list[Job], occupancy: Occupancy) -> float:
    allocator = StrictFifoAllocator(GPUS)
    runner = FakeRunner(occupancy.handler)

    async def one(job: Job) -> None:
        async with allocator.acquire(job.gpus) as ids:
            await runner.run(job_config(job), gpus=ids)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for job in jobs:
            tg.start_soon(one, job)
    return time.perf_counter() - start


async def run(ctx: Context) -> None:
    seeds = SEEDS_SMOKE if ctx.smoke else SEEDS_FULL
    scale = SMOKE_SCALE if ctx.smoke else 1.0
    allocators: dict[str, Callable[[list[Job], Occupancy], Awaitable[float]]] = {
        "dispatcher (GpuPool default)": lambda jobs, occ: via_dispatcher(
            jobs, GpuPool.virtual_devices(GPUS), occ
        ),
        "dispatcher (max_backfill=0)": lambda jobs, occ: via_dispatcher(
            jobs, GpuPool.virtual_devices(GPUS, max_backfill=0), occ
        ),
        "strict FIFO (benchmark's)": via_fifo,
    }
    ours_name = next(iter(allocators))
    rows = []
    worst = 0.0
    ours_vs_fifo: list[float] = []
    for seed in seeds:
        jobs = make_study(seed, scale)
        bound = lower_bound(jobs)
        gpu_seconds = sum(j.gpus * j.duration_s for j in jobs)
        makespans: dict[str, float] = {}
        names = list(allocators)
        shift = seed % len(names)
        for name in names[shift:] + names[:shift]:  # rotate which allocator goes first
            occupancy = Occupancy()
            makespans[name] = await allocators[name](jobs, occupancy)
            if occupancy.conflicts:
                raise BenchmarkError(f"{name}: {occupancy.conflicts} GPU conflicts")
        for name in names:
            makespan = makespans[name]
            rows.append(
                [
                    name,
                    seed,
                    len(jobs),
                    f"{bound:.2f}",
                    f"{makespan:.2f}",
                    f"{makespan / bound:.3f}",
                    f"{gpu_seconds / (GPUS * makespan):.0%}",
                ]
            )
        worst = max(worst, makespans[ours_name] / bound)
        ours_vs_fifo.append(makespans[ours_name] / makespans["strict FIFO (benchmark's)"])
    counts = ", ".join(f"{count}x {k}-GPU" for k, count in MIX)
    print(
        f"  study per seed: {counts}, durations U{DURATION_RANGE} s x {scale}, "
        f"shuffled; {GPUS} virtual GPUs"
    )
    table(["allocator", "seed", "jobs", "bound s", "makespan s", "/bound", "GPU util"], rows)
    print("  ours/strict-FIFO makespan: " + ", ".join(f"{r:.3f}" for r in ours_vs_fifo))
    ctx.check("worst makespan/bound (ours)", f"{worst:.3f}", f"<= {TARGET}", worst <= TARGET)
