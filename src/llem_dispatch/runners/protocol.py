"""The Runner protocol: the public seam between scheduling and execution.

A runner runs one config on given device ids and returns the validated outcome;
everything about GPUs, concurrency, retries and journals lives above it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

from pydantic import BaseModel

from llem_dispatch.models import ExperimentFailure

__all__ = [
    "CpuPlacement",
    "GatedRunner",
    "GpuCheckingRunner",
    "HostObserver",
    "Outcome",
    "PhaseTimes",
    "RunControl",
    "RunInfo",
    "RunObserver",
    "RunPhase",
    "Runner",
    "utcnow",
]

Outcome: TypeAlias = BaseModel | ExperimentFailure


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class PhaseTimes:
    """Where one run's time went before it measured: the GPU's idle gap, in parts.

    "The gate" is when the GPUs became the run's: its gate opening when it was
    prestarted, its start otherwise. From the experiment's marks (the container
    helper writes them; see `llem_dispatch.container`) and the host's own times;
    None where the experiment left no mark for it.
    """

    #: From the experiment's start to ready (a generator's prepare part, or the imports).
    prepare_s: float | None = None
    #: Prestarted runs: from ready (or the start, without marks) to the gate's opening.
    gate_wait_s: float | None = None
    #: From the gate to the first measured work (the experiment's `work` mark).
    gate_to_work_s: float | None = None
    #: When the first measured work began (the `work` mark).
    work_started_at: datetime | None = None
    #: The experiment's resident memory when it was ready (what waiting held).
    ready_rss_bytes: int | None = None
    #: When its work ended (the `done` mark), before its process exited.
    work_ended_at: datetime | None = None
    #: Prestarted runs: how long after its gate opened it was ready (its GPU waited for
    #: its preparation); 0 when it was ready first.
    gate_late_s: float | None = None


@dataclass(slots=True)
class RunInfo:
    """What a runner knows about one run as it progresses; given to observers."""

    config_hash: str
    gpu_ids: tuple[str, ...]
    exchange_dir: str
    log_path: str
    runner_type: str
    image: str | None = None
    image_digest: str | None = None
    #: The engine that ran it, with its URL ("Podman at unix:///..."); None for a process.
    engine: str | None = None
    container_id: str | None = None
    process_id: int | None = None
    started_at: datetime | None = None
    exited_at: datetime | None = None
    exit_code: int | None = None
    #: How the run was given its GPUs: `cdi`, `nvidia` (device requests) or `env`.
    gpu_request: str | None = None
    #: Set as it exits, before `on_exited`: prepare, gate wait, gate to first work,
    #: the end of its work.
    phases: PhaseTimes | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def work_ended_s_ago(self, held_s: float, *, now: float | None = None) -> float:
        """How long before `now` its work ended (the `done` mark): where the GPUs'
        cooldown counts from. Never more than `held_s` (since the run got its GPUs),
        nor less than 0; 0 without the mark."""
        ended = self.phases.work_ended_at if self.phases is not None else None
        if ended is None:
            return 0.0
        ago = (time.time() if now is None else now) - ended.timestamp()
        return min(max(0.0, ago), max(0.0, held_s))


class RunObserver(Protocol):
    """Hooks a dispatcher passes to `Runner.run` to follow one run."""

    def on_started(self, info: RunInfo) -> None:
        """The experiment's process/container has started."""

    def on_exited(self, info: RunInfo) -> None:
        """It has exited (logs and files not yet collected): its GPUs are free now."""


#: Where a run is, as its host sees it (see `HostObserver.on_phase`): `starting`
#: a prestarted run being started, `preparing` started and not yet ready (its prepare part),
#: `waiting` ready and held at its gate, `loading` its GPUs are its own but its
#: measured window has not opened, `measuring` inside its measured window, `finishing`
#: after it (its `done` mark) until its exit.
RunPhase: TypeAlias = Literal[
    "starting", "preparing", "waiting", "loading", "measuring", "finishing"
]


@dataclass(frozen=True, slots=True)
class CpuPlacement:
    """The cores a run may use, and whether it runs at low CPU and I/O priority."""

    cpus: tuple[int, ...]
    low_priority: bool = False
    #: The thread count its thread pools are sized to (OMP_NUM_THREADS and the like):
    #: the cores it measures on, also while it prepares on others.
    threads: int | None = None

    @property
    def count(self) -> int:
        """How many cores (the thread-count variables are set to it)."""
        return len(self.cpus)


class RunControl(Protocol):
    """What a host may do to one started run: pause it, resume it, move its cores.

    Each call is bounded and never raises for a run that has already ended.
    """

    async def pause(self) -> bool:
        """Freeze it (SIGSTOP to its process group; the engine's pause for a
        container); True when it is paused now."""

    async def resume(self) -> None:
        """Thaw it (idempotent)."""

    async def place(self, placement: CpuPlacement) -> None:
        """Move every thread of it to these cores, at this priority."""


@runtime_checkable
class HostObserver(RunObserver, Protocol):
    """A `RunObserver` that also follows a run's phases on its host (quiet windows).

    A runner that supports it (both built-in runners do) calls `cpu_placement`
    before the start, then `on_phase` at each change of phase, awaiting it: before
    `loading` the gate has not opened yet, before `measuring` the measured window
    has not opened yet, so what the host does there (pause its neighbours, move
    its cores) is done before the run goes on.
    """

    def cpu_placement(self, gated: bool) -> CpuPlacement | None:
        """The cores the run starts on (None: not pinned); `gated`: it is held at a gate."""

    async def on_phase(self, phase: RunPhase, control: RunControl) -> None:
        """The run has entered `phase` (`control` acts on it)."""


@runtime_checkable
class Runner(Protocol):
    """Runs one experiment config on the given device ids; returns its validated outcome.

    Infrastructure failures raise `LlemError` subclasses; an experiment that
    reports its own failure returns `ExperimentFailure`.
    """

    runner_type: str

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Sequence[str] | None = None,
        observer: RunObserver | None = None,
    ) -> Outcome: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class GpuCheckingRunner(Runner, Protocol):
    """A Runner that checks, before anything runs, that it can hand over these GPUs.

    Given every GPU the study may hand it (UUIDs where known), it decides how it
    asks its engine for them and raises `ConfigError` for what cannot be done.
    """

    async def check_gpus(self, gpus: Sequence[str]) -> None: ...


@runtime_checkable
class GatedRunner(Runner, Protocol):
    """A Runner that can start a run held at a gate (prestart), when `speaks_gate`.

    Such a run does its start-up (imports, config) at once, but does not touch
    its GPUs until `gate()` has returned; its timeout counts from there.
    """

    @property
    def speaks_gate(self) -> bool: ...

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Sequence[str] | None = None,
        observer: RunObserver | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> Outcome: ...
