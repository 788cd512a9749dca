"""A run's phases as its host follows them: the marks read as they come, quiet granted.

The lifecycle tells a `HostObserver` where its run is (`preparing`, `waiting`,
`loading`, `measuring`, `finishing`) and hands it a `RunHandle` to pause, resume or
move that run. The measured window opens when the experiment asks for quiet (its
`quiet` mark; the container helper asks just before it measures) or, for a program
that never asks, at its gate; the host grants it once it has done what its policy
says (paused the preparing runs beside it), and the window closes at `done`.
"""

from __future__ import annotations

import anyio
import structlog

from llem_dispatch.runners._backend import Run, RunBackend
from llem_dispatch.runners.protocol import (
    CpuPlacement,
    HostObserver,
    RunObserver,
    RunPhase,
)

__all__ = ["MARKS_POLL_S", "PhaseFollower", "RunHandle", "thread_env"]

log = structlog.get_logger("llem_dispatch.quiet")

#: The variables that size the thread pools of OpenMP, BLAS and friends: set to the
#: cores a run has, so that it does not start more threads than it may use.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "RAYON_NUM_THREADS",
)

#: How often the marks file is read while a quiet request may come (seconds): the
#: delay between the experiment asking for its window and the host seeing it.
MARKS_POLL_S = 0.005
#: How often it is read once the window is open (only `done` is left to see).
DONE_POLL_S = 0.05
#: How often a run held before its gate is looked at for its `ready` mark.
READY_POLL_S = 0.05


def thread_env(placement: CpuPlacement | None, env: dict[str, str]) -> dict[str, str]:
    """The thread-count variables for a run on `placement`, those `env` sets kept."""
    if placement is None or not placement.threads:
        return {}
    return {name: str(placement.threads) for name in THREAD_VARIABLES if name not in env}


class RunHandle:
    """The `RunControl` of one run: its backend's pause, resume and core placement."""

    def __init__(self, backend: RunBackend, run: Run) -> None:
        self._backend = backend
        self._run = run

    async def pause(self) -> bool:
        """Freeze it; True when it is paused now (False before it started)."""
        if self._run.info.process_id is None and self._run.info.container_id is None:
            return False
        with anyio.CancelScope(shield=True):
            self._run.paused = await self._backend.pause(self._run)
        return self._run.paused

    async def resume(self) -> None:
        """Thaw it, if it is paused."""
        if not self._run.paused:
            return
        with anyio.CancelScope(shield=True):
            await self._backend.resume(self._run)
        self._run.paused = False

    async def place(self, placement: CpuPlacement) -> None:
        """Move it to these cores (before the start, only remembered for the start)."""
        self._run.cpu = placement
        if self._run.info.process_id is None and self._run.info.container_id is None:
            return
        with anyio.CancelScope(shield=True):
            await self._backend.place(self._run, placement)


class PhaseFollower:
    """Follows one run's phases for its observer; grants quiet whatever the observer.

    `asks_quiet`: the experiment marks `quiet` before it measures (the container
    helper does); otherwise its window opens at its gate (or start).
    """

    def __init__(
        self, backend: RunBackend, run: Run, observer: RunObserver | None, *, asks_quiet: bool
    ) -> None:
        self.run = run
        self.handle = RunHandle(backend, run)
        self.observer = observer if isinstance(observer, HostObserver) else None
        self.asks_quiet = asks_quiet
        self.phase: RunPhase | None = None

    def cpu_placement(self, *, gated: bool) -> CpuPlacement | None:
        """The cores it starts on, as the observer says (None: not pinned)."""
        if self.observer is None:
            return None
        return self.observer.cpu_placement(gated)

    async def enter(self, phase: RunPhase) -> None:
        """Tell the observer, and wait for what it does there (pausing neighbours)."""
        if phase == self.phase:
            return
        self.phase = phase
        if self.observer is None:
            return
        try:
            await self.observer.on_phase(phase, self.handle)
        except Exception as exc:  # noqa: BLE001 - the host's bookkeeping never ends a run
            self.run.bound.warning("phase_hook_failed", phase=phase, error=repr(exc))

    async def handed(self) -> None:
        """Its GPUs are its own now (its gate is about to open, or it is about to start)."""
        await self.enter("loading" if self.asks_quiet else "measuring")

    async def watch_ready(self) -> None:
        """Before the gate: `waiting` once it has marked `ready` (nothing to pause then)."""
        if self.observer is None:
            return
        while True:  # a file another process writes: nothing to wait on but the clock
            if self.phase not in ("starting", "preparing"):
                return  # its gate is opening (`loading`): never back to `waiting`
            if "ready" in self.run.exchange.read_marks():
                await self.enter("waiting")
                return
            await anyio.sleep(READY_POLL_S)

    async def follow(self) -> None:
        """After the gate: grant quiet when it asks, `finishing` at `done`; until cancelled."""
        granted = False
        while True:
            marks = self.run.exchange.read_marks()
            if "quiet" in marks and not granted:
                await self.enter("measuring")
                self.run.exchange.grant_quiet()
                granted = True
            if "done" in marks:
                await self.enter("finishing")
                return
            waiting_for_quiet = self.asks_quiet and not granted
            await anyio.sleep(MARKS_POLL_S if waiting_for_quiet else DONE_POLL_S)
