"""The seam under the shared lifecycle: what a backend (container, process) provides.

`RunBackend` starts, waits, kills, stops and removes its own thing; `Run` is one
run's state the lifecycle and its backend share; `ErrorClasses` are the classes
the backend's runs raise for what the lifecycle detects (timeouts, OOM, exits).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from pydantic import BaseModel

from llem_dispatch._exchange import ExchangeDir
from llem_dispatch._logcapture import LogCapture
from llem_dispatch.errors import (
    ExperimentExitError,
    ExperimentHangError,
    ExperimentOOMError,
    ExperimentTimeoutError,
    RunnerError,
)
from llem_dispatch.runners.protocol import CpuPlacement, RunInfo

__all__ = [
    "KILL_WAIT_S",
    "LOG_DRAIN_S",
    "NEUTRAL_ERRORS",
    "ErrorClasses",
    "ExitStatus",
    "Gate",
    "Pump",
    "Run",
    "RunBackend",
    "RunSettings",
    "check_run_options",
    "helper_script",
]

#: How long a killed container/process may take to exit before it is an error.
KILL_WAIT_S = 15.0
#: How long, after the exit, the output followers may take to reach the end of the stream.
LOG_DRAIN_S = 5.0

Pump: TypeAlias = Callable[[], Awaitable[None]]
#: Awaited after start-up, before the experiment may touch its GPUs (prestart).
Gate: TypeAlias = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ErrorClasses:
    """The classes a backend's runs raise for what the shared lifecycle detects.

    The neutral classes by default (the local runner); the Docker runner gives its
    own subclasses of them (llenergymeasure's contract). `slow_start` is appended
    to the message of a start that outran the timeout: why that may happen.
    """

    timeout: type[ExperimentTimeoutError] = ExperimentTimeoutError
    hang: type[ExperimentHangError] = ExperimentHangError
    oom: type[ExperimentOOMError] = ExperimentOOMError
    bad_exit: type[ExperimentExitError] = ExperimentExitError
    other: type[RunnerError] = RunnerError
    slow_start: str = ""


#: What any backend without classes of its own raises: no engine named in them.
NEUTRAL_ERRORS = ErrorClasses()


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How the experiment ended, as its backend read it.

    `oom` is why the backend believes the kernel's OOM killer ended it (None if not);
    `log_fields` go into the `*_exited` log event.
    """

    code: int
    oom: str | None = None
    log_fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Run:
    """One run's state, shared by `run_lifecycle` and its backend.

    `context` is the error context every `LlemError` of the run carries; backends
    add their ids to it, to `info` and to the bound logger (`bind`).
    """

    exchange: ExchangeDir
    info: RunInfo
    context: dict[str, Any]
    bound: Any
    capture: LogCapture | None = None
    #: `anyio.current_time()` by which the experiment's timeout ends (inf: none).
    deadline: float = math.inf
    #: Once cancelled: by when stopping and removing it must be over, hung engine or not.
    cleanup_deadline: float = math.inf
    #: Epoch seconds: when the host began starting it, and when its gate opened (None:
    #: not held at one). With its marks, they give `info.phases` as it exits.
    launched: float = 0.0
    gate_opened: float | None = None
    #: The cores it starts on (None: not pinned); set before the start.
    cpu: CpuPlacement | None = None
    #: Frozen by its host for a neighbour's measured window (`RunBackend.pause`).
    paused: bool = False

    def bind(self, **fields: Any) -> None:
        """Add fields to every later log event of this run."""
        self.bound = self.bound.bind(**fields)


class RunSettings(Protocol):
    """The runner options the lifecycle reads: public attributes both runners have."""

    @property
    def runner_type(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def image(self) -> str | None: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def silence_timeout(self) -> float | None: ...
    @property
    def result_model(self) -> type[BaseModel] | None: ...
    @property
    def max_result_bytes(self) -> int: ...
    @property
    def secret_env(self) -> Sequence[str]: ...
    @property
    def exchange_base(self) -> str | Path | None: ...
    @property
    def stop_grace_s(self) -> float: ...
    @property
    def function(self) -> str | None: ...


class RunBackend(Protocol):
    """One run's container or process, as `run_lifecycle` drives it.

    Infrastructure failures raise `LlemError` subclasses; those the lifecycle
    detects itself are raised as `errors`' classes. `noun` names the thing in
    log events (`container_started`, `process_killed`, ...).
    """

    noun: str
    log: Any
    image_digest: str | None
    errors: ErrorClasses

    async def prepare(self) -> None:
        """Check what the run needs before any file is written (e.g. the image)."""

    def exchange_root(self, exchange: ExchangeDir) -> str:
        """The exchange dir as the experiment sees it."""

    async def start(self, run: Run) -> None:
        """Bring the experiment up, running; record its ids in `run`."""

    def pumps(self, capture: LogCapture) -> Sequence[Pump]:
        """Coroutines copying its output into `capture`, each returning at end of stream."""

    async def wait(self, run: Run) -> None:
        """Return once it has exited."""

    async def kill(self, run: Run) -> None:
        """SIGKILL it (at a limit); never raises for a thing already gone."""

    async def exited(self, run: Run) -> ExitStatus:
        """After the exit: how it ended; release whatever still holds its output open."""

    async def stop(self, run: Run) -> None:
        """On cancellation: end it gracefully within its grace period (bounded)."""

    async def cleanup(self, run: Run) -> None:
        """Remove what is left of it, success or not (bounded)."""

    async def pause(self, run: Run) -> bool:
        """Freeze it (bounded); True when it is paused now. Never raises."""

    async def resume(self, run: Run) -> None:
        """Thaw it (bounded, idempotent). Never raises."""

    async def place(self, run: Run, placement: CpuPlacement) -> None:
        """Move all of it to these cores, at this priority (bounded). Never raises."""


def check_run_options(
    *, timeout: float | None, silence_timeout: float | None, function: str | None
) -> None:
    """The limits and helper target both runners accept, or a ValueError naming the bad one."""
    if timeout is not None and not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if silence_timeout is not None and silence_timeout <= 0:
        raise ValueError(f"silence_timeout must be positive, got {silence_timeout!r}")
    if function is not None and ":" not in function:
        raise ValueError(f"function must look like 'module:function', got {function!r}")


def helper_script() -> Path:
    """The stdlib container helper's file: run by path, or mounted into an image."""
    return Path(str(resources.files("llem_dispatch") / "container.py"))
