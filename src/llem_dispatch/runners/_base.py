"""The Runner protocol (the seam between scheduling and execution) and shared run logic.

A runner runs one config on given device ids and returns the validated outcome;
everything about GPUs, concurrency, retries and journals lives above it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeAlias, runtime_checkable

import structlog
from pydantic import BaseModel, ValidationError

from llem_dispatch._exchange import ExchangeDir
from llem_dispatch._logging import register_secret
from llem_dispatch.errors import DockerContainerError, ResultError
from llem_dispatch.models import ExperimentFailure, ExperimentResult, RunnerMetadata

__all__ = [
    "DEFAULT_SECRET_ENV",
    "FORCE_KILL",
    "Outcome",
    "RunInfo",
    "RunObserver",
    "Runner",
    "collect_outcome",
    "collect_secrets",
    "finish_success",
    "make_failure",
]

DEFAULT_SECRET_ENV: tuple[str, ...] = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

#: Set (e.g. by a second Ctrl-C) to skip the stop grace period when cancelling runs.
FORCE_KILL = threading.Event()

Outcome: TypeAlias = BaseModel | ExperimentFailure

log = structlog.get_logger("llem_dispatch.runner")


def utcnow() -> datetime:
    return datetime.now(UTC)


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
    container_id: str | None = None
    process_id: int | None = None
    started_at: datetime | None = None
    exited_at: datetime | None = None
    exit_code: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RunObserver(Protocol):
    """Hooks a dispatcher passes to `Runner.run` to follow one run."""

    def on_started(self, info: RunInfo) -> None:
        """The experiment's process/container has started."""

    def on_exited(self, info: RunInfo) -> None:
        """It has exited (logs and files not yet collected): its GPUs are free now."""


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
