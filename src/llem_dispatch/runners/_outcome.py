"""What an exited run leaves, read into its outcome: the result, the error payload, or an error.

After a clean exit the exchange dir holds the experiment's result or its own
error payload; this module validates and labels the one, turns the other into
an `ExperimentFailure`, and raises when there is neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from llem_dispatch._exchange import ExchangeDir
from llem_dispatch._logging import redact, truncate
from llem_dispatch.errors import ResultError
from llem_dispatch.models import ExperimentFailure, ExperimentResult, RunnerMetadata
from llem_dispatch.runners._backend import ErrorClasses
from llem_dispatch.runners.protocol import Outcome, RunInfo

__all__ = ["collect_outcome", "finish_success", "make_failure"]


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
    errors: ErrorClasses,
) -> Outcome:
    """After a clean exit: the error payload, else the result, else a clear error.

    `location` is the exchange dir as the experiment saw it, for error messages;
    a bad exit or a missing result raises `errors.bad_exit`.
    """
    read = exchange.read_outcome(max_bytes=max_result_bytes)
    if read.error is not None:
        bound.warning(
            "experiment_failed", error_type=read.error.get("type"), exchange_dir=str(exchange.path)
        )
        return make_failure(read.error, exchange, info)
    if info.exit_code != 0:
        raise errors.bad_exit(
            f"{info.runner_type} run exited with code {info.exit_code}", **context
        )
    if read.result is None:
        raise errors.bad_exit(
            f"exited 0 but wrote no result at {exchange.path / exchange.result_name}"
            f" ({location}/{exchange.result_name} as the experiment sees it)",
            fix_suggestion="Write the result JSON to $LLEM_RESULT_PATH before exiting.",
            **context,
        )
    if read.result_file != exchange.result_name:
        bound.info("result_read_from", result_file=read.result_file)
    metadata = metadata.model_copy(update={"result_file": read.result_file})
    return finish_success(read.result, data, exchange, metadata, result_model)
