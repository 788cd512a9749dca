"""Following a study's Slurm jobs: one `squeue` call per interval for all of them.

Every attempt waits on the same `JobWatch`; whichever waiter finds no poll in
progress runs the next one (single flight, no background task to own or leak),
and each poll wakes every waiter to look at its job again. The interval starts
at `interval_s`, grows by half after each poll that changed nothing up to
`max_interval_s`, and drops back when a job changes or a new one is tracked.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable

import anyio
import structlog

from llem_dispatch.errors import LlemError
from llem_dispatch.slurm.commands import JobState, squeue_states

__all__ = ["JobWatch", "StateQuery"]

log = structlog.get_logger("llem_dispatch.slurm")

#: Asks Slurm for the state of these jobs (one call for all).
StateQuery = Callable[[Iterable[str]], Awaitable[dict[str, JobState]]]


class JobWatch:
    """The latest known state of each tracked job, refreshed by one query per interval."""

    def __init__(
        self,
        interval_s: float = 1.0,
        max_interval_s: float = 10.0,
        query: StateQuery = squeue_states,
    ) -> None:
        self.interval_s = interval_s
        self.max_interval_s = max(max_interval_s, interval_s)
        self._query = query
        self._states: dict[str, JobState] = {}
        self._tracked: set[str] = set()
        self._gap = interval_s
        self._next_at = -math.inf
        self._polling = False
        self._round = anyio.Event()
        #: How many queries were made (tests count them against the interval).
        self.polls = 0

    def track(self, job_id: str) -> None:
        """Follow `job_id` (a new job: the next poll comes at the shortest interval)."""
        self._tracked.add(job_id)
        self._gap = self.interval_s
        self._next_at = min(self._next_at, anyio.current_time() + self.interval_s)

    def forget(self, job_id: str) -> None:
        """Stop following `job_id`."""
        self._tracked.discard(job_id)
        self._states.pop(job_id, None)

    def state(self, job_id: str) -> JobState | None:
        """The state the last poll saw (None before the first)."""
        return self._states.get(job_id)

    @property
    def tracked(self) -> frozenset[str]:
        """The jobs followed now."""
        return frozenset(self._tracked)

    async def wait(self, job_id: str, done: Callable[[JobState], bool]) -> JobState:
        """Wait until `done(state)` holds for `job_id`'s latest state; return that state.

        `done` is asked again after every poll, so it may also look at files.
        """
        self.track(job_id)
        while True:
            state = self._states.get(job_id)
            if state is not None and done(state):
                return state
            if self._polling:
                await self._round.wait()
            else:
                await self._lead()

    async def _lead(self) -> None:
        """Run the next poll (after its interval), then wake every waiter."""
        self._polling = True
        try:
            await anyio.sleep_until(self._next_at)
            ids = sorted(self._tracked)
            try:
                found = await self._query(ids)
            except LlemError as exc:
                # Slurm slow or briefly unreachable: look again after a longer gap.
                log.warning("slurm_poll_failed", error=exc.message)
                found = {}
                self._gap = min(self.max_interval_s, self._gap * 2)
            self.polls += 1
            changed = any(self._states.get(i) != s for i, s in found.items())
            self._states.update((i, s) for i, s in found.items() if i in self._tracked)
            if changed:
                self._gap = self.interval_s
            else:
                self._gap = min(self.max_interval_s, self._gap * 1.5)
            self._next_at = anyio.current_time() + self._gap
        finally:
            # Also when the leader is cancelled: the others wake, and one leads next.
            self._polling = False
            woken, self._round = self._round, anyio.Event()
            woken.set()
