"""Placement: how and where one attempt of an experiment runs (the Dispatcher's seam).

The Dispatcher owns policy (retries, events, the concurrency cap, the record); a
placement only runs one attempt, as an httpx transport only sends one request.
`LocalPlacement` runs it through a Runner on GPUs from this host's pool; the Ray
backend (`llem_dispatch.cluster`) places it on a cluster's nodes.

With `prestart`, a local attempt that finds its GPUs busy is promised the GPUs
of a running lease of its size, starts its container at once held at a gate,
and has the gate opened when those GPUs are free and cooled down: the GPU idles
for the gate, not for a container start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio

from llem_dispatch.dispatch.records import GpuAtStart, RecordDraft
from llem_dispatch.gpu import GpuLease, GpuPool
from llem_dispatch.gpu.discovery import nvml_thermal
from llem_dispatch.models import HashedConfig
from llem_dispatch.runners.protocol import GatedRunner, Outcome, RunInfo, Runner, utcnow

__all__ = ["LocalPlacement", "Placement"]


class Placement(Protocol):
    """Runs one attempt of an experiment somewhere; the Dispatcher decides everything else."""

    @property
    def runner_type(self) -> str | None:
        """The runner type records name (None when not known)."""

    def check_request(self, gpus: int) -> None:
        """Raise `GpuRequestError` at once for a request that can never be met here."""

    def parallelism(self) -> int:
        """How many attempts can usefully be in flight at once (sizes `map`'s workers)."""

    async def attempt(
        self,
        config: HashedConfig,
        gpus: int,
        draft: RecordDraft,
        on_started: Callable[[], None],
    ) -> Outcome:
        """Run one attempt on `gpus` GPUs and return its outcome.

        Fill `draft` as the attempt goes (GPU ids, container, times, node) and call
        `on_started` once it has started. Raise `LlemError` for an infrastructure
        failure; whether to try again is the Dispatcher's call. On cancellation,
        clean up what was started before re-raising.
        """

    async def aclose(self) -> None:
        """Release what the placement holds (idempotent)."""


class _LeaseObserver:
    """Fills the draft as one run progresses; frees its GPUs the moment it exits."""

    def __init__(self, lease: GpuLease, draft: RecordDraft, on_started: Callable[[], None]) -> None:
        self._lease = lease
        self._draft = draft
        self._on_started = on_started
        self.started_mono: float | None = None
        #: When the GPUs were last released before this run got them (known ones).
        self.released: list[float] = []

    def on_started(self, info: RunInfo) -> None:
        self.started_mono = anyio.current_time()
        draft = self._draft
        draft.started_at = info.started_at
        draft.container_id = info.container_id
        draft.process_id = info.process_id
        draft.exchange_dir = info.exchange_dir
        draft.log_path = info.log_path
        draft.image = info.image
        draft.image_digest = info.image_digest
        self._on_started()

    def on_exited(self, info: RunInfo) -> None:
        self._draft.exited_at = info.exited_at
        self._lease.release()


class LocalPlacement:
    """This host: GPUs leased from `pool`, each attempt run by `runner`.

    With `prestart` and a runner that speaks the gate (`function:` runs), an
    attempt whose GPUs are busy starts before they free, held at its gate (see
    the module's docstring); otherwise `prestart` changes nothing. Closing the
    placement closes its runner.
    """

    def __init__(
        self, runner: Runner, pool: GpuPool | None = None, *, prestart: bool = False
    ) -> None:
        self.runner = runner
        self.pool = pool if pool is not None else GpuPool([])
        self.runner_type: str | None = getattr(runner, "runner_type", None)
        #: Whether attempts are prestarted (asked for, and the runner speaks the gate).
        self.prestart = prestart and isinstance(runner, GatedRunner) and runner.speaks_gate

    def check_request(self, gpus: int) -> None:
        """Raise `GpuRequestError` for more GPUs than the pool has."""
        self.pool.check_request(gpus)

    def parallelism(self) -> int:
        """The pool's size (twice it with prestart), and at least 8 (GPU-less ones share)."""
        return max(self.pool.size * (2 if self.prestart else 1), 8)

    async def attempt(
        self,
        config: HashedConfig,
        gpus: int,
        draft: RecordDraft,
        on_started: Callable[[], None],
    ) -> Outcome:
        """Lease `gpus` GPUs, run the config on them, record the hand-off gap.

        A prestarted attempt runs on a promise of busy GPUs, held at its gate
        until `wait_ready` says they are its own.
        """
        async with self.pool.acquire(gpus, early=self.prestart) as lease:
            observer = _LeaseObserver(lease, draft, on_started)
            if not lease.pending:
                self._hand_on(lease, draft, observer)
                return await self._run(config, lease, draft, observer, None)
            draft.prestarted = True
            draft.gpu_ids = list(lease)

            async def gate() -> None:
                await lease.wait_ready()
                self._hand_on(lease, draft, observer)
                draft.gate_opened_at = utcnow()

            return await self._run(config, lease, draft, observer, gate)

    async def _run(
        self,
        config: HashedConfig,
        lease: GpuLease,
        draft: RecordDraft,
        observer: _LeaseObserver,
        gate: Callable[[], Awaitable[None]] | None,
    ) -> Outcome:
        try:
            if gate is None:
                return await self.runner.run(config, gpus=tuple(lease), observer=observer)
            assert isinstance(self.runner, GatedRunner)
            return await self.runner.run(config, gpus=tuple(lease), observer=observer, gate=gate)
        finally:
            if observer.released and observer.started_mono is not None:
                # From the GPUs' last release to this run's start (its gate) on them.
                draft.handoff_gap_s = max(0.0, observer.started_mono - max(observer.released))

    def _hand_on(self, lease: GpuLease, draft: RecordDraft, observer: _LeaseObserver) -> None:
        """The GPUs are the attempt's now: describe them, note when they were released."""
        self._describe(lease, draft)
        known = (self.pool.last_released(i) for i in lease)
        observer.released = [t for t in known if t is not None]

    def _describe(self, lease: GpuLease, draft: RecordDraft) -> None:
        """Which GPUs the attempt got: ids, UUIDs, model, and their state at hand-on."""
        draft.gpu_ids = list(lease)
        uuids, names = self.pool.uuids, self.pool.names
        draft.gpu_uuids = [uuids[i] for i in lease if i in uuids]
        draft.gpu_name = ", ".join(sorted({names[i] for i in lease if i in names})) or None
        draft.gpus_at_start = []
        if self.pool.virtual:
            return
        for gpu in lease:
            settle = lease.settle.get(gpu)
            reading = (settle.temperature_c, settle.power_w) if settle else nvml_thermal(gpu)
            draft.gpus_at_start.append(
                GpuAtStart(
                    id=gpu,
                    uuid=uuids.get(gpu),
                    name=names.get(gpu),
                    temperature_c=reading[0] if reading else None,
                    power_w=reading[1] if reading else None,
                    settle_wait_s=settle.waited_s if settle else None,
                    settled=settle.settled if settle else None,
                )
            )

    async def aclose(self) -> None:
        """Close the runner (idempotent)."""
        await self.runner.aclose()
