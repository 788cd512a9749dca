"""The run lifecycle both runners share: secrets, bounded waits, kills, outcomes.

The Runner protocol itself is in `protocol`; this module is the mechanism under it.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import anyio
import structlog
from pydantic import BaseModel, ValidationError

from llem_dispatch._exchange import ExchangeDir
from llem_dispatch._logcapture import LogCapture, watch_silence
from llem_dispatch._logging import register_secret
from llem_dispatch.errors import (
    DockerContainerError,
    DockerHangError,
    DockerTimeoutError,
    LlemError,
    ResultError,
)
from llem_dispatch.models import ExperimentFailure, ExperimentResult, RunnerMetadata
from llem_dispatch.runners.protocol import Outcome, RunInfo

__all__ = [
    "DEFAULT_SECRET_ENV",
    "FORCE_KILL",
    "KilledFor",
    "check_run_options",
    "collect_outcome",
    "collect_secrets",
    "finish_success",
    "force_kill_requested",
    "killed_error",
    "make_failure",
    "set_force_kill",
    "wait_bounded",
    "wait_until_forced",
]

DEFAULT_SECRET_ENV: tuple[str, ...] = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

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
    """Turn an error payload into an `ExperimentFailure` (the exchange dir is kept)."""
    return ExperimentFailure(
        type=str(payload.get("type", "UnknownError")),
        message=str(payload.get("message", "")),
        traceback=str(payload["traceback"]) if payload.get("traceback") is not None else None,
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
    with anyio.CancelScope() as scope:
        if timeout_s is not None:
            scope.deadline = anyio.current_time() + timeout_s
        async with anyio.create_task_group() as watch:
            if silence_s is not None:
                watch.start_soon(watch_silence, capture, silence_s, scope, hang)
            await wait()
            watch.cancel_scope.cancel()
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
