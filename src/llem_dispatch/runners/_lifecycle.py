"""The run lifecycle both runners share, written once: `run_lifecycle` over a `RunBackend`.

Exchange dir, secrets, start, bounded supervision (timeout, silence watchdog,
observer), outcome and clean-up live here; a backend (container or process) only
starts, waits, kills, stops and removes its own thing. The Runner protocol itself
is in `protocol`; this module is the mechanism under it.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias

import anyio
import anyio.abc
import structlog
from pydantic import BaseModel, ValidationError

from llem_dispatch._exchange import ExchangeDir
from llem_dispatch._logcapture import LogCapture, watch_silence
from llem_dispatch._logging import redact, register_secret, truncate
from llem_dispatch.errors import (
    DockerContainerError,
    DockerError,
    DockerHangError,
    DockerOOMError,
    DockerTimeoutError,
    LlemError,
    ResultError,
)
from llem_dispatch.models import (
    ExperimentFailure,
    ExperimentResult,
    RunnerMetadata,
    compute_config_hash,
    config_to_dict,
)
from llem_dispatch.runners.protocol import Outcome, RunInfo, RunObserver, utcnow

__all__ = [
    "DEFAULT_SECRET_ENV",
    "FORCE_KILL",
    "KILL_WAIT_S",
    "LOG_DRAIN_S",
    "ExitStatus",
    "Gate",
    "KilledFor",
    "Pump",
    "Run",
    "RunBackend",
    "RunSettings",
    "check_run_options",
    "collect_outcome",
    "collect_secrets",
    "finish_success",
    "force_kill_requested",
    "helper_script",
    "killed_error",
    "make_failure",
    "run_lifecycle",
    "set_force_kill",
    "wait_bounded",
    "wait_until_forced",
]

DEFAULT_SECRET_ENV: tuple[str, ...] = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
#: How long a killed container/process may take to exit before it is an error.
KILL_WAIT_S = 15.0
#: How long, after the exit, the output followers may take to reach the end of the stream.
LOG_DRAIN_S = 5.0

#: Set (e.g. by a second Ctrl-C) to skip the stop grace period when cancelling runs.
#: Change it through `set_force_kill`, which can be undone.
FORCE_KILL = threading.Event()


def set_force_kill(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Skip (or stop skipping) the stop grace period of runs being cancelled.

    Takes effect at once; use the return value as a context manager to restore the
    previous setting on exit (tests), or ignore it (a second Ctrl-C).
    """
    previous = FORCE_KILL.is_set()
    _apply_force_kill(on)

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        try:
            yield
        finally:
            _apply_force_kill(previous)

    return restore()


def force_kill_requested() -> bool:
    """Whether cancelled runs skip their stop grace period now."""
    return FORCE_KILL.is_set()


def _apply_force_kill(on: bool) -> None:
    if on:
        FORCE_KILL.set()
    else:
        FORCE_KILL.clear()


log = structlog.get_logger("llem_dispatch.runner")


def collect_secrets(
    names: Sequence[str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Secrets from the host environment, registered for redaction."""
    env = os.environ if environ is None else environ
    found = {name: env[name] for name in names if env.get(name)}
    for value in found.values():
        register_secret(value)
    return found


def make_failure(
    payload: Mapping[str, Any], exchange: ExchangeDir, info: RunInfo
) -> ExperimentFailure:
    """Turn an error payload into an `ExperimentFailure` (the exchange dir is kept).

    Message and traceback are redacted (a token in an exception's text stays out of
    records, logs and the terminal) and cut to their head and tail past 64 KiB (the
    whole payload stays in the kept exchange dir).
    """
    raw_traceback = payload.get("traceback")
    return ExperimentFailure(
        type=truncate(redact(str(payload.get("type", "UnknownError"))), 200),
        message=truncate(redact(str(payload.get("message", "")))),
        traceback=truncate(redact(str(raw_traceback))) if raw_traceback is not None else None,
        config_hash=exchange.config_hash,
        exchange_dir=str(exchange.path),
        container_id=info.container_id,
        log_path=info.log_path,
        exit_code=info.exit_code,
    )


def finish_success(
    data: dict[str, Any],
    config: dict[str, Any],
    exchange: ExchangeDir,
    metadata: RunnerMetadata,
    result_model: type[BaseModel] | None,
) -> BaseModel:
    """Validate the result and add runner metadata; raises `ResultError` on a bad schema."""
    if result_model is None:
        return ExperimentResult(
            config_hash=exchange.config_hash,
            data=data,
            effective_config={**config, **metadata.as_effective_config()},
            runner=metadata,
        )
    try:
        result = result_model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()[:10]
        )
        raise ResultError(
            f"result does not match {result_model.__name__}: {problems}",
            fix_suggestion=f"Make the experiment's output match {result_model.__name__}, "
            "or pass the right result_model.",
            config_hash=exchange.config_hash,
            exchange_dir=exchange.path,
        ) from exc
    if "effective_config" in type(result).model_fields:
        current = getattr(result, "effective_config", None)
        merged = {
            **(current if isinstance(current, dict) else {}),
            **metadata.as_effective_config(),
        }
        # model_copy works for frozen models too.
        result = result.model_copy(update={"effective_config": merged})
    return result


def collect_outcome(
    data: dict[str, Any],
    exchange: ExchangeDir,
    info: RunInfo,
    metadata: RunnerMetadata,
    result_model: type[BaseModel] | None,
    context: dict[str, Any],
    bound: Any,
    *,
    max_result_bytes: int,
    location: str,
) -> Outcome:
    """After a clean exit: the error payload, else the result, else a clear error.

    `location` is the exchange dir as the experiment saw it, for error messages.
    """
    read = exchange.read_outcome(max_bytes=max_result_bytes)
    if read.error is not None:
        bound.warning(
            "experiment_failed", error_type=read.error.get("type"), exchange_dir=str(exchange.path)
        )
        return make_failure(read.error, exchange, info)
    if info.exit_code != 0:
        raise DockerContainerError(
            f"{info.runner_type} run exited with code {info.exit_code}", **context
        )
    if read.result is None:
        raise DockerContainerError(
            f"exited 0 but wrote no result at {exchange.path / exchange.result_name}"
            f" ({location}/{exchange.result_name} as the experiment sees it)",
            fix_suggestion="Write the result JSON to $LLEM_RESULT_PATH before exiting.",
            **context,
        )
    if read.result_file != exchange.result_name:
        bound.info("result_read_from", result_file=read.result_file)
    metadata = metadata.model_copy(update={"result_file": read.result_file})
    return finish_success(read.result, data, exchange, metadata, result_model)


KilledFor: TypeAlias = Literal["timeout", "hang"]


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


async def wait_bounded(
    wait: Callable[[], Awaitable[object]],
    capture: LogCapture,
    *,
    timeout_s: float | None,
    silence_s: float | None,
) -> KilledFor | None:
    """Await the experiment's exit under its timeout and silence limit.

    Returns None when it exited by itself, else which limit fired (the caller
    then kills it). An error raised by `wait` propagates.
    """
    hang = anyio.Event()
    error: LlemError | None = None
    with anyio.CancelScope() as scope:
        if timeout_s is not None:
            scope.deadline = anyio.current_time() + timeout_s
        async with anyio.create_task_group() as watch:
            if silence_s is not None:
                watch.start_soon(watch_silence, capture, silence_s, scope, hang)
            try:
                await wait()
            except LlemError as exc:
                # Raised out of the task group it would arrive wrapped in an
                # ExceptionGroup, which no caller (nor the retry policy) expects.
                error = exc
            watch.cancel_scope.cancel()
    if error is not None:
        raise error
    if not scope.cancelled_caught:
        return None
    return "hang" if hang.is_set() else "timeout"


def killed_error(
    killed_for: KilledFor | None,
    *,
    timeout: float | None,
    silence_timeout: float | None,
    context: dict[str, Any],
) -> LlemError | None:
    """The error for a run we killed at one of its limits (None if we did not)."""
    if killed_for == "hang":
        return DockerHangError(f"no output for {silence_timeout}s: killed as hung", **context)
    if killed_for == "timeout":
        return DockerTimeoutError(f"timed out after {timeout}s and was killed", **context)
    return None


async def wait_until_forced() -> None:
    """Return once FORCE_KILL is set (a second Ctrl-C)."""
    # FORCE_KILL is a threading.Event set from a signal handler: poll it.
    while not FORCE_KILL.is_set():  # noqa: ASYNC110
        await anyio.sleep(0.1)


def helper_script() -> Path:
    """The stdlib container helper's file: run by path, or mounted into an image."""
    return Path(str(resources.files("llem_dispatch") / "container.py"))


# -- the shared lifecycle ----------------------------------------------------------------

Pump: TypeAlias = Callable[[], Awaitable[None]]
#: Awaited after start-up, before the experiment may touch its GPUs (prestart).
Gate: TypeAlias = Callable[[], Awaitable[None]]


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
    #: Once cancelled: by when stopping and removing it must be over, hung daemon or not.
    cleanup_deadline: float = math.inf

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


class RunBackend(Protocol):
    """One run's container or process, as `run_lifecycle` drives it.

    Infrastructure failures raise `LlemError` subclasses. `noun` names the thing in
    log events (`container_started`, `process_killed`, ...).
    """

    noun: str
    log: Any
    image_digest: str | None

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


async def run_lifecycle(
    settings: RunSettings,
    backend: RunBackend,
    config: BaseModel | Mapping[str, Any],
    *,
    gpus: Sequence[str] | None,
    observer: RunObserver | None,
    gate: Gate | None = None,
) -> Outcome:
    """Run one experiment through `backend`; return its validated result or failure.

    With `gate` (prestart), the experiment is started held at its gate, and
    opened once `gate()` returns: its start, timeout and observer count from there.
    The exchange dir is removed after a success only; a clean-up error is a
    warning and never changes the outcome.
    """
    data = config_to_dict(config)
    config_hash = compute_config_hash(data)
    # The timeout covers the whole attempt, from the first API call on: a daemon
    # stuck at `create` or `start` cannot hold an experiment past it.
    deadline = anyio.current_time() + (settings.timeout or math.inf)
    await backend.prepare()
    run = _open_run(settings, backend, config_hash, tuple(str(g) for g in gpus or ()))
    run.deadline = deadline
    run.exchange.gated = gate is not None
    succeeded = False
    try:
        run.exchange.write_config(data)
        run.exchange.write_secrets(collect_secrets(settings.secret_env))
        await _start(settings, backend, run)
        if gate is not None:
            await _pass_gate(settings, backend, run, gate)
        run.capture = LogCapture(run.exchange.log_path)
        error = await _supervise(settings, backend, run, run.capture, observer)
        if error is not None:
            raise error
        metadata = RunnerMetadata(
            runner_type=settings.runner_type,
            runner_image=settings.image,
            image_digest=run.info.image_digest,
            runner_source=settings.source,
            container_id=run.info.container_id,
            process_id=run.info.process_id,
            gpu_ids=list(run.info.gpu_ids),
            exit_code=run.info.exit_code,
        )
        outcome = collect_outcome(
            data,
            run.exchange,
            run.info,
            metadata,
            settings.result_model,
            run.context,
            run.bound,
            max_result_bytes=settings.max_result_bytes,
            location=backend.exchange_root(run.exchange),
        )
        succeeded = not isinstance(outcome, ExperimentFailure)
        return outcome
    except BaseException as exc:
        await _on_failure(settings, backend, run, exc)
        raise
    finally:
        await _clean_up(backend, run, remove_exchange=succeeded)


async def _start(settings: RunSettings, backend: RunBackend, run: Run) -> None:
    """Bring it up, within what is left of the experiment's timeout."""
    with anyio.CancelScope(deadline=run.deadline) as scope:
        await backend.start(run)
    if scope.cancelled_caught:
        raise DockerTimeoutError(
            f"timed out after {settings.timeout}s before the {backend.noun} had started "
            "(the Docker daemon is slow or stuck)",
            **run.context,
        )


async def _pass_gate(settings: RunSettings, backend: RunBackend, run: Run, gate: Gate) -> None:
    """Hold the started experiment until `gate()` returns, then open its gate.

    Meanwhile it does its CPU-side start-up. If it exits first (an import
    error), the gate stays shut and its exit is supervised as usual. The
    experiment's timeout counts from here. Errors leave the task group
    unwrapped, as the `LlemError` they are.
    """
    errors: list[LlemError] = []
    async with anyio.create_task_group() as watch:

        async def exited_early() -> None:
            try:
                await backend.wait(run)
                run.bound.info(f"{backend.noun}_exited_at_gate")
            except LlemError as exc:
                errors.append(exc)
            watch.cancel_scope.cancel()

        watch.start_soon(exited_early)
        await gate()
        run.exchange.open_gate()
        watch.cancel_scope.cancel()
    if errors:
        raise errors[0]
    run.deadline = anyio.current_time() + (settings.timeout or math.inf)


def _open_run(
    settings: RunSettings, backend: RunBackend, config_hash: str, gpu_ids: tuple[str, ...]
) -> Run:
    exchange = ExchangeDir.create(config_hash, base_dir=settings.exchange_base)
    info = RunInfo(
        config_hash=config_hash,
        gpu_ids=gpu_ids,
        exchange_dir=str(exchange.path),
        log_path=str(exchange.log_path),
        runner_type=settings.runner_type,
        image=settings.image,
        image_digest=backend.image_digest,
    )
    context: dict[str, Any] = {
        "config_hash": config_hash,
        "exchange_dir": exchange.path,
        "log_path": exchange.log_path,
    }
    bound = backend.log.bind(config_hash=config_hash, gpus=list(gpu_ids))
    return Run(exchange=exchange, info=info, context=context, bound=bound)


async def _supervise(
    settings: RunSettings,
    backend: RunBackend,
    run: Run,
    capture: LogCapture,
    observer: RunObserver | None,
) -> LlemError | None:
    """From start to exit under the limits; the error for how it ended, if any."""
    info = run.info
    info.started_at = utcnow()
    capture.touch()
    run.bound.info(f"{backend.noun}_started")
    if observer is not None:
        observer.on_started(info)
    errors: list[LlemError] = []
    async with anyio.create_task_group() as followers:
        drained = [_follow(followers, pump) for pump in backend.pumps(capture)]
        try:
            killed_for, status = await _until_exit(settings, backend, run, capture, observer)
        except LlemError as exc:
            # Kept out of the task group: it would arrive wrapped in an ExceptionGroup.
            errors.append(exc)
        else:
            with anyio.move_on_after(LOG_DRAIN_S):
                for done in drained:
                    await done.wait()
        followers.cancel_scope.cancel()
    if errors:
        raise errors[0]
    return _exit_error(settings, backend.noun, run, capture, status, killed_for)


async def _until_exit(
    settings: RunSettings,
    backend: RunBackend,
    run: Run,
    capture: LogCapture,
    observer: RunObserver | None,
) -> tuple[KilledFor | None, ExitStatus]:
    """Wait under the limits (kill at one), tell the observer, read how it ended."""
    killed_for = await wait_bounded(
        lambda: backend.wait(run),
        capture,
        timeout_s=None if math.isinf(run.deadline) else run.deadline - anyio.current_time(),
        silence_s=settings.silence_timeout,
    )
    if killed_for is not None:
        run.bound.warning(f"{backend.noun}_killed", reason=killed_for)
        await _kill_and_wait(backend, run)
    run.info.exited_at = utcnow()
    if observer is not None:
        observer.on_exited(run.info)
    return killed_for, await backend.exited(run)


def _follow(followers: anyio.abc.TaskGroup, pump: Pump) -> anyio.Event:
    """Start `pump` in `followers`; the event is set once it has returned."""
    done = anyio.Event()

    async def follow() -> None:
        try:
            await pump()
        finally:
            done.set()

    followers.start_soon(follow)
    return done


async def _kill_and_wait(backend: RunBackend, run: Run) -> None:
    await backend.kill(run)
    try:
        with anyio.fail_after(KILL_WAIT_S):
            await backend.wait(run)
    except TimeoutError as exc:
        raise DockerError(
            f"{backend.noun} did not exit within {KILL_WAIT_S}s of SIGKILL", **run.context
        ) from exc


def _exit_error(
    settings: RunSettings,
    noun: str,
    run: Run,
    capture: LogCapture,
    status: ExitStatus,
    killed_for: KilledFor | None,
) -> LlemError | None:
    """Record the exit; a kill at a limit, then the OOM killer, are errors."""
    run.info.exit_code = status.code
    run.context["exit_code"] = status.code
    run.context["stderr_snippet"] = capture.tail("stderr") or capture.tail("stdout")
    run.bound.info(f"{noun}_exited", exit_code=status.code, **status.log_fields)
    killed = killed_error(
        killed_for,
        timeout=settings.timeout,
        silence_timeout=settings.silence_timeout,
        context=run.context,
    )
    if killed is not None:
        return killed
    if status.oom is not None:
        return DockerOOMError(status.oom, **run.context)
    return None


#: Once cancelled, seconds beyond the stop grace period for stopping and removing a
#: run: enough for a healthy daemon, and a bound on an exit against a hung one.
CANCEL_SLACK_S = 4.0


async def _on_failure(
    settings: RunSettings, backend: RunBackend, run: Run, exc: BaseException
) -> None:
    cancelled = isinstance(exc, anyio.get_cancelled_exc_class() | KeyboardInterrupt)
    if isinstance(exc, LlemError) or cancelled:
        run.bound.warning(
            "run_failed", error=type(exc).__name__, exchange_dir=str(run.exchange.path)
        )
    if cancelled:
        grace = 0.0 if FORCE_KILL.is_set() else settings.stop_grace_s
        run.cleanup_deadline = anyio.current_time() + grace + CANCEL_SLACK_S
        with anyio.CancelScope(shield=True, deadline=run.cleanup_deadline):
            await backend.stop(run)


async def _clean_up(backend: RunBackend, run: Run, *, remove_exchange: bool) -> None:
    """Secrets, log file, the container/process, then (after a success) the exchange dir.

    Never raises an `Exception`: a clean-up failure is a warning and leaves the
    run's outcome (result or error) as it was.
    """
    _attempt(run, "secrets", run.exchange.remove_secrets)
    if run.capture is not None:
        _attempt(run, "log", run.capture.close)
    try:
        with anyio.CancelScope(shield=True, deadline=run.cleanup_deadline) as scope:
            await backend.cleanup(run)
        if scope.cancelled_caught:
            run.bound.warning("cleanup_cut_short", step=backend.noun, reason="interrupted")
    except Exception as exc:  # noqa: BLE001 - a clean-up error must not replace the outcome
        run.bound.warning("cleanup_failed", step=backend.noun, error=repr(exc))
    if remove_exchange:
        _attempt(run, "exchange_dir", run.exchange.remove)


def _attempt(run: Run, step: str, action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - a clean-up error must not replace the outcome
        run.bound.warning("cleanup_failed", step=step, error=repr(exc))
