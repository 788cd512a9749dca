"""Following a study's Slurm jobs: one `squeue` call per interval for all of them, and
a look (a `stat`) at their attempts' files on the shared filesystem between polls.

Every attempt waits on the same `JobWatch`; whichever waiter finds no round in
progress leads the next one (single flight, no background task to own or leak).
A job's own files say first that it began (`started.json`) and ended
(`outcome.json`): a waiter may name files, and the leader stats every named file
each `look_interval_s` (in a worker thread: a shared filesystem can be slow), waking
the waiters only when one appears. `squeue` stays the liveness check, for a job
that ends without writing (node failure, scancel, time limit, OOM kill): its
interval starts at `interval_s`, grows by half after each poll that changed nothing
up to `max_interval_s`, and drops back when a job changes or a new one is tracked.
Every poll wakes every waiter to look at its job again.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import anyio
import structlog

from llem_dispatch.errors import LlemError
from llem_dispatch.slurm.commands import JobState, squeue_states

__all__ = ["JobWatch", "PathExists", "StateQuery"]

log = structlog.get_logger("llem_dispatch.slurm")

#: Asks Slurm for the state of these jobs (one call for all).
StateQuery = Callable[[Iterable[str]], Awaitable[dict[str, JobState]]]
#: Whether a file is there (called in a worker thread, once per file per look).
PathExists = Callable[[Path], bool]


class JobWatch:
    """The latest known state of each tracked job, refreshed by one query per interval,
    and which of the files waiters named exist, looked at every `look_interval_s`."""

    def __init__(
        self,
        interval_s: float = 1.0,
        max_interval_s: float = 10.0,
        query: StateQuery = squeue_states,
        *,
        look_interval_s: float = 0.1,
        exists: PathExists = os.path.exists,
    ) -> None:
        self.interval_s = interval_s
        self.max_interval_s = max(max_interval_s, interval_s)
        self.look_interval_s = look_interval_s
        self._query = query
        self._exists = exists
        self._states: dict[str, JobState] = {}
        self._tracked: set[str] = set()
        self._gap = interval_s
        self._next_at = -math.inf
        #: Files some waiter waits for (how many waiters), and those seen to exist.
        self._files: Counter[Path] = Counter()
        self._seen: set[Path] = set()
        self._next_look_at = math.inf
        #: The leader's sleep until its next poll or look: moved earlier when needed.
        self._nap: anyio.CancelScope | None = None
        self._polling = False
        self._round = anyio.Event()
        #: How many queries were made (tests count them against the interval).
        self.polls = 0
        #: How many files were stat'ed (tests count them against the look interval).
        self.stats = 0

    def track(self, job_id: str) -> None:
        """Follow `job_id` (a new job: the next poll comes at the shortest interval)."""
        self._tracked.add(job_id)
        self._gap = self.interval_s
        self._poll_by(anyio.current_time() + self.interval_s)

    def hurry(self) -> None:
        """Poll Slurm now (a job's files say it ended: learn how, or that it left)."""
        self._gap = self.interval_s
        self._poll_by(anyio.current_time())

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
        found = await self.wait_or_file(job_id, done, ())
        assert isinstance(found, JobState)
        return found

    async def wait_or_file(
        self, job_id: str, done: Callable[[JobState], bool], files: Sequence[Path]
    ) -> JobState | Path:
        """Whichever comes first: `done(state)` holds at a poll (that state), or one of
        `files` exists at a look (the first of them that does)."""
        self.track(job_id)
        for path in files:
            self._files[path] += 1
        if files:
            self._look_by(anyio.current_time() + self.look_interval_s)
        try:
            while True:
                for path in files:
                    if path in self._seen:
                        return path
                state = self._states.get(job_id)
                if state is not None and done(state):
                    return state
                if self._polling:
                    await self._round.wait()
                else:
                    await self._lead()
        finally:
            for path in files:
                self._files[path] -= 1
                if self._files[path] <= 0:
                    del self._files[path]
                    self._seen.discard(path)
            if not self._files:
                self._next_look_at = math.inf

    def _poll_by(self, at: float) -> None:
        self._next_at = min(self._next_at, at)
        if self._nap is not None:
            self._nap.deadline = min(self._nap.deadline, at)

    def _look_by(self, at: float) -> None:
        self._next_look_at = min(self._next_look_at, at)
        if self._nap is not None:
            self._nap.deadline = min(self._nap.deadline, at)

    async def _lead(self) -> None:
        """Run rounds (a look at the files, a poll when due) until one finds something
        new, then wake every waiter."""
        self._polling = True
        try:
            while True:
                with anyio.CancelScope(deadline=min(self._next_at, self._next_look_at)) as nap:
                    self._nap = nap
                    await anyio.sleep_forever()
                self._nap = None
                news = False
                if self._files and anyio.current_time() >= self._next_look_at:
                    news = await self._look()
                if anyio.current_time() >= self._next_at:
                    await self._poll()
                    news = True  # `done` may look at files, as it always could
                if news:
                    return
        finally:
            # Also when the leader is cancelled: the others wake, and one leads next.
            self._nap = None
            self._polling = False
            woken, self._round = self._round, anyio.Event()
            woken.set()

    async def _look(self) -> bool:
        """Stat each waited-for file not yet seen (off the event loop); any new one?"""
        paths = [p for p in self._files if p not in self._seen]
        self._next_look_at = anyio.current_time() + self.look_interval_s
        if not paths:
            return False
        self.stats += len(paths)
        found = await anyio.to_thread.run_sync(
            lambda: [p for p in paths if self._exists(p)], abandon_on_cancel=True
        )
        # Kept only while someone still waits for the file.
        new = {p for p in found if p in self._files}
        self._seen |= new
        return bool(new)

    async def _poll(self) -> None:
        """One query for every tracked job; the next poll's time from what changed."""
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
