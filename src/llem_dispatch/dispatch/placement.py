"""Placement: where the attempts of an experiment run (the Dispatcher's seam, and a study's).

The Dispatcher owns policy (retries, events, the concurrency cap, the record); a
placement only runs one attempt, as an httpx transport only sends one request.
`LocalPlacement` runs it through a Runner on GPUs from this host's pool; the Ray
placement (`llem_dispatch.cluster.RayPlacement`) runs it on a cluster's nodes; the
Slurm placement (`llem_dispatch.slurm.SlurmPlacement`) as one Slurm job. A study
names its placement once (`placement: local | ray | slurm`, see
`llem_dispatch.dispatch.registry`); `run_study` builds it from a `PlacementRequest`
with `for_study` and then only calls the methods below, whatever the placement.

With `prestart`, a local attempt that finds its GPUs busy is promised the GPUs
of a running lease of its size, starts its container at once held at a gate,
and has the gate opened when those GPUs are free and cooled down: the GPU idles
for the gate, not for a container start. While the host has less memory available
than `prestart_memory_reserve`, such an attempt is not started early: it waits for
its GPUs and starts then (its record says `prestart_held: memory`), so experiments
prepared and waiting cannot push the host into swap.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import structlog
from pydantic import BaseModel

from llem_dispatch.dispatch.attempt import AttemptReport
from llem_dispatch.dispatch.depth import MAX_AUTO_DEPTH, PrepareDepth
from llem_dispatch.dispatch.lease_observer import LeaseObserver, host_cores
from llem_dispatch.dispatch.memory import MemoryReserve
from llem_dispatch.dispatch.quiet import Policy, QuietHost
from llem_dispatch.dispatch.records import GpuAtStart, RecordDraft
from llem_dispatch.errors import ConfigError
from llem_dispatch.gpu import GpuLease, GpuPool, SettleSpec
from llem_dispatch.gpu.attempt_telemetry import NodeTelemetry
from llem_dispatch.gpu.cores import CorePlan
from llem_dispatch.gpu.discovery import nvml_thermal
from llem_dispatch.models import HashedConfig
from llem_dispatch.runners import CANCEL_SLACK_S, ForceKill, current_force_kill
from llem_dispatch.runners.kinds import DoctorCheck
from llem_dispatch.runners.protocol import (
    GatedRunner,
    GpuCheckingRunner,
    Outcome,
    Runner,
    utcnow,
)

log = structlog.get_logger("llem_dispatch.placement")

__all__ = [
    "HostContext",
    "HostGpus",
    "HostNeeds",
    "HostRunnerFactory",
    "LocalPlacement",
    "Placement",
    "PlacementRequest",
    "ThisHost",
]


class HostContext(Protocol):
    """What a runner factory knows about the host it builds a runner on."""

    @property
    def virtual(self) -> bool:
        """No real GPUs there: run without device requests."""

    @property
    def driver_host(self) -> bool:
        """The host is the driver's own (the driver's paths are valid there)."""


@dataclass(frozen=True, slots=True)
class ThisHost:
    """The `HostContext` of this host (the local placement's only one)."""

    virtual: bool
    driver_host: bool = True


#: Builds the runner on the host where attempts run: called once on this host by
#: the local placement, once per attempt on the node by the Ray one (so it must
#: pickle there: a module-level function, a `functools.partial`, a dataclass).
HostRunnerFactory = Callable[[HostContext], Runner]


@dataclass(frozen=True, slots=True)
class HostGpus:
    """Which GPUs of this host a study asked for: ids, `auto` (NVML), or N virtual ids.

    `ids` None and `virtual` None: nothing was chosen (detect them, as `auto`).
    """

    ids: tuple[str, ...] | Literal["auto"] | None = None
    virtual: int | None = None
    #: Hold back a real GPU while more than this much of its memory is in use.
    residual_memory_mb: float | None = 512

    @property
    def chosen(self) -> bool:
        """Whether the study (or the command line) chose this host's GPUs at all."""
        return self.ids is not None or self.virtual is not None

    def pool(self, *, cooldown_s: float = 0.0, settle: SettleSpec | None = None) -> GpuPool:
        """The GPU pool these describe (NVML detection for `auto` or nothing chosen)."""
        if self.virtual is not None:
            return GpuPool.virtual_devices(self.virtual, cooldown_s=cooldown_s, settle=settle)
        residual = self.residual_memory_mb
        if self.ids is None or self.ids == "auto":
            return GpuPool.detect(cooldown_s=cooldown_s, residual_memory_mb=residual, settle=settle)
        return GpuPool.named(
            list(self.ids), cooldown_s=cooldown_s, residual_memory_mb=residual, settle=settle
        )


@dataclass(frozen=True, slots=True)
class HostNeeds:
    """What every host that may run an experiment must have, checked before anything runs."""

    #: Images the runner starts (a Docker runner's; empty otherwise).
    images: tuple[str, ...] = ()
    #: Folders the runner reads (a local runner's study folder; empty otherwise).
    paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """What a study asks of its placement, as typed plain values (built once by `run_study`).

    A placement takes what it can use and says (one warning) what it cannot honour.
    """

    #: Builds the study's runner where attempts run.
    runner_factory: HostRunnerFactory
    #: The runner kind chosen (docker, local, ...), or `auto` to decide on each host.
    runner_kind: str
    #: The most GPUs any one experiment asks for (checked before anything runs).
    max_gpu_count: int
    results_dir: Path
    #: Per-GPU cooldown after each experiment, seconds.
    cooldown_s: float = 0.0
    settle: SettleSpec | None = None
    #: This host's GPUs (the local placement's pool).
    host_gpus: HostGpus = HostGpus()
    #: A pool built by the caller, used instead of `host_gpus` (local placement only).
    pool: GpuPool | None = None
    prestart: bool = False
    #: Host memory prestarted runs must leave available (bytes); None: the default share.
    prestart_memory_reserve: int | None = None
    stop_grace_s: float = 10.0
    host_needs: HostNeeds = HostNeeds()
    #: The study's name (a batch scheduler's job names carry it).
    study_name: str = ""
    #: The study's per-experiment timeout (a batch scheduler's time limit follows it).
    timeout_s: float | None = None
    #: Checks of the runner on this host before anything runs (e.g. the `function:`
    #: module importable in the image); run by placements that run attempts here.
    check_here: Callable[[], Awaitable[object]] | None = None
    #: Reaps this host's leftovers of the study's dead runs (a container runner's
    #: orphans, logs kept), before it starts; None when the runner leaves none.
    reap_here: Callable[[], Awaitable[object]] | None = None
    #: What preparing runs do while one measures on their host (`pause` or `run`).
    isolation: Policy = "pause"
    #: Prestarted experiments per GPU ahead of the running one, or `auto` (measured).
    prestart_depth: int | Literal["auto"] = 1
    #: Cores each GPU's experiments measure on (None: NVML's nearest share on real GPUs,
    #: no pinning on virtual ones).
    cpus_per_gpu: int | None = None
    #: The study's force-kill switch (a second Ctrl-C): set, a placement ends the
    #: attempts it is cancelling at once, not within their stop grace.
    force_kill: ForceKill = field(default_factory=current_force_kill)
    #: GPU telemetry each attempt samples where it runs, for placements that run them
    #: away from this host (this host's own is sampled by `run_study`); None: off.
    telemetry: NodeTelemetry | None = None


class Placement(abc.ABC):
    """Where attempts run: the one seam between the dispatcher and the hosts.

    A `Dispatcher` calls only the attempt-level methods (`check_request`,
    `parallelism`, `attempt`, `aclose`, and reads `runner_type`), so a subclass
    that defines those (at run time, any object that has them) plugs into
    `Dispatcher(placement=...)`. A placement chosen by
    name from a study (`placement:` in the study file, see
    `llem_dispatch.dispatch.registry`) also has `for_study`, and `run_study`
    calls its study-level hooks: `prepare` before anything runs, `sweep`
    before and after, `describe` for the results dir. Nothing else knows which
    placement it is.
    """

    #: Whether attempts run on this host: then the runner is chosen here (`auto`
    #: decided now) and may be given ready-built; otherwise each host decides.
    on_this_host: ClassVar[bool] = True
    #: The runner type records name (None when not known).
    runner_type: str | None = None
    #: How long `run_study`'s end-of-study sweep may take (it is cut there).
    STUDY_SWEEP_S: ClassVar[float] = 90.0
    #: The model of its settings block in a study (`NAME: {...}`, named after the
    #: placement), validated at load with each problem at its line; None: no block.
    settings_model: ClassVar[type[BaseModel] | None] = None
    #: Why `--gpus`/`--virtual-gpus` (GPUs of this host) mean nothing here, and the fix
    #: (for a placement whose attempts run elsewhere).
    gpus_assigned_elsewhere: ClassVar[tuple[str, str]] = (
        "this placement assigns each experiment's GPUs itself",
        "Drop them.",
    )

    @classmethod
    def for_study(cls, request: PlacementRequest, settings: BaseModel | None) -> Placement:
        """Build the placement for a study: `request`, and the study's settings block.

        `settings` is the study's block named after the placement (`ray: {...}`), an
        instance of `settings_model` already validated at load (its defaults when the
        study gives no block); None for a placement without settings.
        """
        raise ConfigError(
            f"{cls.__name__} cannot be chosen from a study (it has no `for_study`)",
            fix_suggestion="Give it to `Dispatcher(placement=...)` instead.",
        )

    @classmethod
    def stop_bound_s(cls, stop_grace_s: float, settings: BaseModel | None) -> float:
        """The longest a cancelled study takes to stop here, every step in its own bound.

        From the cancel to the last attempt stopped (its grace kept) and removed, and
        the end-of-study sweep done. The CLI's last-resort exit waits this long, so
        it never cuts short a clean-up that is still within its bounds; only a
        clean-up stuck past them (a hung engine) is abandoned, and left to `reap`.
        Default: the runners' own bound (the grace, then the kill and removal).
        """
        return stop_grace_s + CANCEL_SLACK_S

    @classmethod
    async def doctor_checks(cls, settings: BaseModel | None, folder: Path) -> list[DoctorCheck]:
        """`doctor`'s lines for this placement (its engine, its GPUs), with `settings`
        (the study's block, or None) and `folder` where it may write a probe.

        Default: none (this host's checks are the runner kinds' own).
        """
        return []

    @abc.abstractmethod
    def check_request(self, gpus: int) -> None:
        """Raise `GpuRequestError` at once for a request that can never be met here."""

    @abc.abstractmethod
    def parallelism(self) -> int:
        """How many attempts can usefully be in flight at once (sizes `map`'s workers)."""

    @abc.abstractmethod
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

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release what the placement holds (idempotent)."""

    async def prepare(self, request: PlacementRequest) -> None:
        """Before anything runs: raise the error that would stop every experiment.

        By default, the largest request is checked against what this placement has.
        """
        self.check_request(request.max_gpu_count)

    async def sweep(self, request: PlacementRequest, *, study_over: bool) -> None:
        """Remove what a crashed run of this study left where attempts run.

        Called before the study (`study_over=False`: only orphans of dead owners)
        and after it (`True`: anything of this study is left over). Default: nothing.
        """
        return  # a placement that leaves nothing behind has nothing to sweep

    def describe(self) -> Mapping[str, Any]:
        """Where the study ran, as JSON facts for study.json and the journal."""
        return {}

    def telemetry_devices(self) -> tuple[str, ...]:
        """Real GPUs of this host that `run_study`'s telemetry samples (none by default:
        virtual ids, or GPUs on other hosts, which a sampler there would have to read)."""
        return ()


class LocalPlacement(Placement):
    """This host: GPUs leased from `pool`, each attempt run by `runner`.

    With `prestart` and a runner that speaks the gate (both built-in runners do), an
    attempt whose GPUs are busy starts before they free, held at its gate (see
    the module's docstring); otherwise `prestart` changes nothing. Closing the
    placement closes its runner.
    """

    def __init__(
        self,
        runner: Runner,
        pool: GpuPool | None = None,
        *,
        prestart: bool = False,
        memory_reserve: MemoryReserve | None = None,
        isolation: Policy = "pause",
        cores: CorePlan | None = None,
        prestart_depth: int | Literal["auto"] = 1,
    ) -> None:
        self.runner = runner
        self.pool = pool if pool is not None else GpuPool([])
        #: This host's quiet windows: preparing runs paused while one measures (`pause`).
        self.quiet = QuietHost(isolation)
        #: Each GPU's cores (None: runs are not pinned).
        self.cores = cores
        #: `auto`: the depth follows the measured prepare and run times (`PrepareDepth`).
        self.depth = PrepareDepth() if prestart_depth == "auto" else None
        if isinstance(prestart_depth, int):
            self.pool.prestart_depth = prestart_depth
        self.runner_type: str | None = getattr(runner, "runner_type", None)
        #: Whether attempts are prestarted (asked for, and the runner speaks the gate).
        self.prestart = prestart and isinstance(runner, GatedRunner) and runner.speaks_gate
        #: What a prestart must leave available of the host's memory.
        self.memory_reserve = memory_reserve if memory_reserve is not None else MemoryReserve()

    @classmethod
    def for_study(cls, request: PlacementRequest, settings: BaseModel | None) -> LocalPlacement:
        """The study's pool (or `request.pool`), checked, and its runner built here."""
        pool = request.pool
        if pool is None:
            pool = request.host_gpus.pool(cooldown_s=request.cooldown_s, settle=request.settle)
        # Before the runner is built: a request no GPU set here can meet is the first error.
        pool.check_request(request.max_gpu_count)
        runner = request.runner_factory(ThisHost(virtual=pool.virtual))
        reserve = MemoryReserve(request.prestart_memory_reserve)
        return cls(
            runner,
            pool,
            prestart=request.prestart,
            memory_reserve=reserve,
            isolation=request.isolation,
            cores=host_cores(pool, request.cpus_per_gpu, keep_spare=request.prestart),
            prestart_depth=request.prestart_depth,
        )

    async def prepare(self, request: PlacementRequest) -> None:
        """The runner's own checks here (the pool was checked when it was built)."""
        if request.check_here is not None:
            await request.check_here()
        if isinstance(self.runner, GpuCheckingRunner):
            # How the engine is asked for the GPUs (by UUID through CDI, or not), decided
            # and refused here, before anything runs.
            await self.runner.check_gpus(self.pool.handed(self.pool.devices))

    async def sweep(self, request: PlacementRequest, *, study_over: bool) -> None:
        """Before the study, reap this host's containers of dead runs (their logs kept)."""
        # After the study every attempt here has ended and removed what it started.
        if not study_over and request.reap_here is not None:
            await request.reap_here()

    def describe(self) -> Mapping[str, Any]:
        """This host's GPU ids, and whether they are virtual."""
        return {"gpus": list(self.pool.devices), "virtual_gpus": self.pool.virtual}

    def telemetry_devices(self) -> tuple[str, ...]:
        """The pool's GPUs, unless they are virtual ids."""
        return () if self.pool.virtual else tuple(self.pool.devices)

    def check_request(self, gpus: int) -> None:
        """Raise `GpuRequestError` for more GPUs than the pool has."""
        self.pool.check_request(gpus)

    def parallelism(self) -> int:
        """The pool's size (times 1 + the deepest prestart depth with prestart), and at
        least 8 (GPU-less ones share)."""
        ahead = (MAX_AUTO_DEPTH if self.depth is not None else self.pool.prestart_depth) + 1
        return max(self.pool.size * (ahead if self.prestart else 1), 8)

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
            observer = LeaseObserver(
                lease, draft, on_started, self.quiet, self.cores, on_late=self._deepen
            )
            if lease.pending and not self.memory_reserve.allows_prestart():
                # Too little host memory for one more prepared, waiting run: start late.
                draft.prestart_held = "memory"
                await lease.wait_ready()
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
        observer: LeaseObserver,
        gate: Callable[[], Awaitable[None]] | None,
    ) -> Outcome:
        try:
            # Handed over by UUID where known: never a guessable index.
            gpus = self.pool.handed(lease)
            if gate is None:
                return await self.runner.run(config, gpus=gpus, observer=observer)
            assert isinstance(self.runner, GatedRunner)
            return await self.runner.run(config, gpus=gpus, observer=observer, gate=gate)
        finally:
            await observer.finish()
            if observer.released and observer.started_mono is not None:
                # From the GPUs' last release to this run's start (its gate) on them.
                draft.handoff_gap_s = max(0.0, observer.started_mono - max(observer.released))
            if observer.info is not None:
                # Its phases too, now that it has exited: the same report every placement uses.
                AttemptReport.of(observer.info).fill(draft)
                await self._learn_depth(draft)

    async def _learn_depth(self, draft: RecordDraft) -> None:
        """`auto` depth: as deep as this run's measured preparation and hold need."""
        if self.depth is None or not self.prestart or draft.gate_to_work_s is None:
            return
        window_s = 0.0
        if draft.work_started_at is not None and draft.work_ended_at is not None:
            window_s = (draft.work_ended_at - draft.work_started_at).total_seconds()
        # gate_to_work_s counts from the gate, or from the start for an unprestarted run.
        held_s = draft.gate_to_work_s + window_s
        if not draft.prestarted:
            held_s -= draft.prepare_s or 0.0
        before = self.pool.prestart_depth
        depth = self.depth.observe(
            prepare_s=draft.prepare_s,
            held_s=held_s,
            cooldown_s=self.pool.cooldown_s,
            window_s=window_s,
            frozen_in_windows=self.quiet.policy == "pause" and not draft.prestarted,
        )
        if depth != before:
            await self.pool.deepen(depth)
            log.info("prestart_deeper", depth=depth, prepare_s=draft.prepare_s, held_s=held_s)

    async def _deepen(self) -> None:
        """`auto` depth: a prestarted run was late, so start the next ones further ahead."""
        if self.depth is not None:
            before = self.pool.prestart_depth
            await self.pool.deepen(self.depth.late())
            if self.pool.prestart_depth != before:
                log.info("prestart_deeper", depth=self.pool.prestart_depth)

    def _hand_on(self, lease: GpuLease, draft: RecordDraft, observer: LeaseObserver) -> None:
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
