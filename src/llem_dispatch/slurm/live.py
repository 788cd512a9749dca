"""A study's jobs in the Slurm queue: stopping them within their grace, or at once when forced.

Jobs submitted (or adopted) and not yet seen to end are `live`, and cancelled on
close; jobs whose result was taken from their outcome file while Slurm still listed
them are `exiting`, waited for before the study ends. Stopping a running job sends
its processes SIGTERM and leaves it to end by itself: its runner stops the
experiment within the study's stop grace and removes what it started (a plain
`scancel` would SIGKILL it Slurm's `KillWait` later, whatever the grace). A job
still there after the grace, or not yet running, is cancelled outright. If the
study's `ForceKill` is set meanwhile (a second Ctrl-C), every live job gets SIGKILL
at once. Every wait is bounded and shielded.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import structlog

from llem_dispatch.runners import CANCEL_SLACK_S, ForceKill
from llem_dispatch.slurm import commands
from llem_dispatch.slurm.attempts import Attempt, Ledger
from llem_dispatch.slurm.settings import SlurmSettings
from llem_dispatch.slurm.watch import JobWatch

__all__ = ["LiveJobs"]

log = structlog.get_logger("llem_dispatch.slurm")


class LiveJobs:
    """The study's jobs still in the queue, and how they are stopped."""

    def __init__(
        self,
        settings: SlurmSettings,
        watch: JobWatch,
        ledger: Ledger,
        force_kill: ForceKill,
        *,
        grace_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.watch = watch
        self.ledger = ledger
        self.force_kill = force_kill
        #: How long a running job's runner may take to stop its experiment.
        self.grace_s = grace_s
        #: Jobs submitted (or adopted) and not yet seen to end: cancelled on close.
        self.live: dict[str, Attempt] = {}
        #: Jobs whose result was taken from their outcome file while Slurm still listed
        #: them (exiting): the study waits for them to leave the queue before it ends.
        self.exiting: set[str] = set()
        self._killed = False

    @staticmethod
    def grace_wait_s(settings: SlurmSettings, grace_s: float) -> float:
        """How long a running job is given to stop by itself: its runner's grace and
        slack, and the longest gap between two polls that see it leave."""
        return grace_s + CANCEL_SLACK_S + settings.max_poll_interval_s

    @classmethod
    def bound_s(cls, settings: SlurmSettings, grace_s: float) -> float:
        """The longest `cancel` or `cancel_all` takes: the grace, then an outright cancel."""
        stop_s = cls.grace_wait_s(settings, grace_s)
        return 2 * commands.CALL_TIMEOUT_S + stop_s + settings.cancel_timeout_s

    def _running(self, job_id: str) -> bool:
        state = self.watch.state(job_id)
        attempt = self.live.get(job_id)
        return (state is not None and state.running) or (
            attempt is not None and attempt.started is not None
        )

    async def _stop(self, job_ids: Sequence[str]) -> None:
        """Stop these jobs (running ones within their grace) until they have left the
        queue; a forced stop meanwhile kills every live job now."""
        running = [j for j in job_ids if self._running(j)]
        waiting = [j for j in job_ids if j not in running]
        if running:
            await commands.scancel(running, signal="TERM")
        if waiting:
            await commands.scancel(waiting)
        async with anyio.create_task_group() as tg:

            async def kill_when_forced() -> None:
                await self.force_kill.wait()
                await self.kill_all()

            tg.start_soon(kill_when_forced)
            with anyio.move_on_after(self.grace_wait_s(self.settings, self.grace_s)):
                await self._gone(job_ids)
            left = [j for j in job_ids if (s := self.watch.state(j)) is None or s.active]
            if left:
                log.warning("slurm_jobs_past_grace", jobs=left, grace_s=self.grace_s)
                await commands.scancel(left)
                await self._gone(left)
            tg.cancel_scope.cancel()

    async def _gone(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            await self.watch.wait(job_id, lambda s: not s.active)

    async def kill_all(self) -> None:
        """SIGKILL every live job, in one call, once (a forced stop); poll at once."""
        if self._killed or not self.live:
            return
        self._killed = True
        log.warning("slurm_jobs_killed", jobs=sorted(self.live), reason="forced")
        await commands.scancel(self.live, signal="KILL")
        # Those that were still pending: SIGKILL reaches no process of theirs.
        await commands.scancel(self.live)
        self.watch.hurry()

    async def cancel(self, attempt: Attempt) -> None:
        """Stop the job and wait (bounded) until it has left the queue; shielded."""
        if attempt.job_id is None:
            return
        attempt.cancelled_by_us = True
        job_id = attempt.job_id
        bound = self.bound_s(self.settings, self.grace_s)
        with anyio.CancelScope(shield=True), anyio.move_on_after(bound):
            try:
                await self._stop([job_id])
            except Exception as exc:  # noqa: BLE001 - cleanup: the sweep tries again
                log.warning("slurm_cancel_failed", job_id=job_id, error=repr(exc))
            else:
                self.live.pop(job_id, None)
                self.ledger.ended(attempt, "CANCELLED")

    async def cancel_all(self) -> None:
        """Every job of the study still live, stopped together (bounded, shielded)."""
        live = dict(self.live)
        if not live:
            return
        log.warning("slurm_jobs_cancelled", jobs=sorted(live))
        bound = self.bound_s(self.settings, self.grace_s)
        with anyio.CancelScope(shield=True), anyio.move_on_after(bound):
            await self._stop(sorted(live))
            for job_id in live:
                self.watch.forget(job_id)
                self.live.pop(job_id, None)

    async def until_exited(self) -> None:
        """Until the jobs whose result was taken early have left the queue: `squeue`
        at once, then at gaps that start at `file_poll_interval_s` and double up to
        `poll_interval_s` (they are exiting: a poll or two); one still there after
        `cancel_timeout_s`, hung in its exit, is cancelled. Bounded and shielded."""
        exiting = sorted(self.exiting)
        self.exiting.clear()
        gap = self.settings.file_poll_interval_s
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.settings.cancel_timeout_s):
                while exiting:
                    try:
                        states = await commands.squeue_states(exiting)
                    except Exception as exc:  # noqa: BLE001 - cleanup: nothing more to do
                        log.warning("slurm_poll_failed", error=repr(exc))
                        return
                    exiting = [j for j in exiting if states[j].active]
                    if exiting:
                        await anyio.sleep(gap)
                        gap = min(gap * 2, self.settings.poll_interval_s)
            if exiting:
                log.warning("slurm_job_exit_hung", jobs=exiting)
                with anyio.move_on_after(commands.CALL_TIMEOUT_S):
                    await commands.scancel(exiting)
