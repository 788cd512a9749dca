"""JobWatch: one query per interval for every job, back-off, a cancelled leader replaced."""

from __future__ import annotations

from collections.abc import Iterable

import anyio

from llem_dispatch.slurm.commands import JobState
from llem_dispatch.slurm.watch import JobWatch


class FakeSlurm:
    """Jobs that run for a number of polls, then complete; counts the queries."""

    def __init__(self, lifetimes: dict[str, int]) -> None:
        self.lifetimes = lifetimes
        self.queries: list[list[str]] = []
        self.times: list[float] = []

    async def query(self, ids: Iterable[str]) -> dict[str, JobState]:
        asked = list(ids)
        self.queries.append(asked)
        self.times.append(anyio.current_time())
        n = len(self.queries)
        return {
            i: JobState(i, "RUNNING" if n < self.lifetimes[i] else "COMPLETED", "node1")
            for i in asked
        }


async def test_many_waiters_share_one_query_per_interval() -> None:
    slurm = FakeSlurm({str(i): 3 + i % 3 for i in range(50)})
    watch = JobWatch(0.01, 0.05, query=slurm.query)
    ended: dict[str, str] = {}

    async def follow(job: str) -> None:
        state = await watch.wait(job, lambda s: not s.active)
        ended[job] = state.state

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for job in slurm.lifetimes:
                tg.start_soon(follow, job)
    assert ended == dict.fromkeys(slurm.lifetimes, "COMPLETED")
    # 50 jobs, the longest lives 5 polls: a handful of queries, not one per job per poll.
    assert len(slurm.queries) <= 6
    assert max(len(q) for q in slurm.queries) == 50


async def test_the_interval_backs_off_while_nothing_changes() -> None:
    slurm = FakeSlurm({"1": 8})
    watch = JobWatch(0.01, 0.04, query=slurm.query)
    with anyio.fail_after(10):
        await watch.wait("1", lambda s: not s.active)
    # RUNNING, RUNNING, ...: unchanged polls grow the gap up to its ceiling.
    gaps = [b - a for a, b in zip(slurm.times, slurm.times[1:], strict=False)]
    assert len(slurm.queries) == 8
    assert gaps[-1] >= 0.04
    assert gaps[1] < 0.04


async def test_a_cancelled_leader_hands_the_polling_on() -> None:
    slurm = FakeSlurm({"1": 2, "2": 4})
    watch = JobWatch(0.01, 0.02, query=slurm.query)
    got: list[str] = []

    async def follow(job: str) -> None:
        got.append((await watch.wait(job, lambda s: not s.active)).state)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            with anyio.move_on_after(0.001):
                await watch.wait("1", lambda s: False)  # leads, then is cancelled
            tg.start_soon(follow, "2")
    assert got == ["COMPLETED"]


async def test_a_failing_query_is_retried_later() -> None:
    from llem_dispatch.errors import ClusterError

    calls = 0

    async def flaky(ids: Iterable[str]) -> dict[str, JobState]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ClusterError("Socket timed out", transient=True)
        return {i: JobState(i, "COMPLETED") for i in ids}

    watch = JobWatch(0.01, 0.05, query=flaky)
    with anyio.fail_after(10):
        state = await watch.wait("7", lambda s: not s.active)
    assert state.state == "COMPLETED"
    assert calls == 2
