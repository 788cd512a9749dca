"""Inside an allocation: each attempt as a job step, one `srun` process per attempt.

The driver runs in a Slurm job (`SLURM_JOB_ID` set, e.g. under `sbatch` or
`salloc`): Slurm has already given it its nodes and GPUs, so attempts are steps
of that job (`srun --exact -N1 -n1 --gpus=N`), which Slurm packs onto the
allocation's GPUs without overlap. The `srun` process ending is the step ending;
how it ended is read from its exit and its messages (`srun` prints Slurm's
reason, e.g. `CANCELLED ... DUE TO TIME LIMIT`), then from the step's outcome file.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Sequence

import anyio
import anyio.abc
import structlog
from pydantic import BaseModel

from llem_dispatch.dispatch import RecordDraft
from llem_dispatch.runners.protocol import Outcome
from llem_dispatch.slurm import commands
from llem_dispatch.slurm.attempts import Attempt, fill_started, outcome_of
from llem_dispatch.slurm.settings import SlurmSettings

__all__ = ["StepRunner", "step_state"]

log = structlog.get_logger("llem_dispatch.slurm")

#: srun's own messages that name how a step ended, most specific first.
_SAID = (
    ("DUE TO TIME LIMIT", "TIMEOUT"),
    ("DUE TO NODE FAIL", "NODE_FAIL"),
    ("DUE TO PREEMPTION", "PREEMPTED"),
    ("OUT_OF_MEMORY", "OUT_OF_MEMORY"),
    ("oom-kill", "OUT_OF_MEMORY"),
    ("CANCELLED", "CANCELLED"),
)


def step_state(returncode: int, said: str) -> str:
    """A step's end as a Slurm job state, from `srun`'s exit status and messages."""
    for text, state in _SAID:
        if text in said:
            return state
    return "COMPLETED" if returncode == 0 else "FAILED"


class StepRunner:
    """Runs attempts as steps of the allocation this driver runs in."""

    def __init__(self, settings: SlurmSettings) -> None:
        self.settings = settings
        self._running: set[anyio.abc.Process] = set()

    async def run(
        self,
        attempt: Attempt,
        argv: Sequence[str],
        draft: RecordDraft,
        on_started: Callable[[], None],
        result_model: type[BaseModel],
        bound_s: float | None,
    ) -> Outcome:
        """Run `argv` (an `srun` command line) to its end; the attempt's outcome."""
        said_path = attempt.folder / "srun.err"
        with said_path.open("wb") as said:
            process = await anyio.open_process(
                list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=said
            )
        self._running.add(process)
        try:
            await self._until_started(process, attempt)
            fill_started(draft, attempt, None)
            if attempt.started is not None:
                on_started()
            with anyio.move_on_after(bound_s if bound_s is not None else float("inf")) as scope:
                await process.wait()
            if scope.cancelled_caught:
                await self._stop(process, attempt)
            returncode = process.returncode if process.returncode is not None else -9
        except anyio.get_cancelled_exc_class():
            await self._stop(process, attempt)
            raise
        finally:
            self._running.discard(process)
        state = (
            "TIMEOUT"
            if scope.cancelled_caught
            else step_state(returncode, said_path.read_text(errors="replace"))
        )
        fill_started(draft, attempt, None)
        return outcome_of(attempt, state, draft, result_model)

    async def _until_started(self, process: anyio.abc.Process, attempt: Attempt) -> None:
        """Until the step wrote started.json, or ended (a stat per interval, no Slurm call)."""
        started = attempt.folder / "started.json"
        while process.returncode is None and not started.exists():
            with anyio.move_on_after(self.settings.poll_interval_s):
                await process.wait()

    async def _stop(self, process: anyio.abc.Process, attempt: Attempt) -> None:
        """SIGTERM to srun (it passes it to the step), then the step's scancel; shielded."""
        attempt.cancelled_by_us = True
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(self.settings.cancel_timeout_s):
                await process.wait()
                return
            started = attempt.started or {}
            if started.get("job_id") and started.get("step_id"):
                with anyio.move_on_after(commands.CALL_TIMEOUT_S):
                    await commands.scancel([f"{started['job_id']}.{started['step_id']}"])
            process.kill()
            with anyio.move_on_after(10):
                await process.wait()
            log.warning("slurm_step_killed", folder=str(attempt.folder))

    async def aclose(self) -> None:
        """Stop any step still running (attempts stop their own; this is the backstop)."""
        for process in list(self._running):
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
