"""What one local run tells its placement as it goes: its record's facts, its GPUs
freed at its exit, its phases for the host's quiet windows, and the cores it runs on.

`LeaseObserver` is the `RunObserver` a `LocalPlacement` gives each run; `host_cores`
splits this host's cores among the pool's GPUs (NVML's nearest share on real GPUs).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import anyio

from llem_dispatch.dispatch.attempt import AttemptReport
from llem_dispatch.dispatch.quiet import QuietHost
from llem_dispatch.dispatch.records import RecordDraft
from llem_dispatch.gpu import GpuLease, GpuPool
from llem_dispatch.gpu.cores import CorePlan, plan_cores
from llem_dispatch.gpu.discovery import nvml_cpu_affinity
from llem_dispatch.runners.protocol import CpuPlacement, RunControl, RunInfo, RunPhase

__all__ = ["LeaseObserver", "host_cores"]


class LeaseObserver:
    """Fills the draft as one run progresses; frees its GPUs the moment it exits.

    It also follows the run's phases for its host's quiet windows (`quiet`) and
    places it on its cores (`cores`): the spare ones at low priority while it
    prepares, its GPUs' own once they are its.
    """

    def __init__(
        self,
        lease: GpuLease,
        draft: RecordDraft,
        on_started: Callable[[], None],
        quiet: QuietHost | None = None,
        cores: CorePlan | None = None,
        on_late: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._lease = lease
        #: Called when its gate opens while it still prepares (its GPU waits for it).
        self._on_late = on_late
        self._phase: RunPhase | None = None
        self._draft = draft
        self._on_started = on_started
        self._quiet = quiet
        self._cores = cores
        self._moved = False
        self.started_mono: float | None = None
        #: When the GPUs were last released before this run got them (known ones).
        self.released: list[float] = []
        self.info: RunInfo | None = None

    def _measuring(self) -> CpuPlacement | None:
        cpus = self._cores.measuring(list(self._lease)) if self._cores is not None else ()
        return CpuPlacement(cpus, threads=len(cpus)) if cpus else None

    def cpu_placement(self, gated: bool) -> CpuPlacement | None:
        """Its GPUs' cores; while it prepares held at a gate, the spare ones, low priority."""
        measuring = self._measuring()
        if measuring is None or self._cores is None:
            return None
        self._draft.cpus = list(measuring.cpus)
        if not gated:
            self._moved = True
            return measuring
        return CpuPlacement(self._cores.preparing(), low_priority=True, threads=measuring.threads)

    async def on_phase(self, phase: RunPhase, control: RunControl) -> None:
        """Tell the host's quiet windows; onto its own cores once its GPUs are its."""
        before, self._phase = self._phase, phase
        if before == "preparing" and phase in ("loading", "measuring") and self._on_late:
            await self._on_late()
        if self._quiet is not None:
            await self._quiet.on_phase(self, phase, control)
        if phase in ("loading", "measuring") and not self._moved:
            self._moved = True
            measuring = self._measuring()
            if measuring is not None:
                await control.place(measuring)

    async def finish(self) -> None:
        """The run has ended: what overlapped its measured window goes into the record."""
        if self._quiet is None:
            return
        share = await self._quiet.finish(self)
        draft = self._draft
        draft.isolation = self._quiet.policy
        if share is not None and share.opened:
            draft.window_prepare_overlap_s = round(share.prepare_s, 3)
            draft.window_work_overlap_s = round(share.work_s, 3)
            draft.neighbours_paused_s = round(share.paused_s, 3)
            draft.window_disturbed = share.disturbed

    def on_started(self, info: RunInfo) -> None:
        self.info = info
        self.started_mono = anyio.current_time()
        AttemptReport.of(info).fill(self._draft)
        self._on_started()

    def on_exited(self, info: RunInfo) -> None:
        self._draft.exited_at = info.exited_at
        ago = 0.0
        if self.started_mono is not None:
            # The cooldown counts from the end of its work (never before it got the
            # GPUs): the exit's own teardown (CUDA, the interpreter) overlaps it.
            ago = info.work_ended_s_ago(anyio.current_time() - self.started_mono)
        self._lease.release(work_ended_s_ago=ago)


def host_cores(pool: GpuPool, per_gpu: int | None, *, keep_spare: bool) -> CorePlan | None:
    """This host's cores split among the pool's GPUs (None: virtual GPUs with no
    `per_gpu`, or no GPUs: nothing is pinned)."""
    if not pool.devices or (pool.virtual and per_gpu is None):
        return None
    affinity = {}
    if not pool.virtual:
        for gpu in pool.devices:
            near = nvml_cpu_affinity(gpu)
            if near is not None:
                affinity[gpu] = near
    host = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not host:
        return None
    return plan_cores(
        host, list(pool.devices), per_gpu=per_gpu, affinity=affinity, keep_spare=keep_spare
    )
