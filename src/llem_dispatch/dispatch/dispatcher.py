"""The Dispatcher: GPUs, concurrency, retries and events around a Runner.

Policy lives here; a Runner only runs one experiment. Every run ends as a
`RunRecord`, whatever happened, so one failure never cancels the others.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import anyio
import structlog
from pydantic import BaseModel

from llem_dispatch.dispatch.fanout import fan_out
from llem_dispatch.dispatch.records import (
    ErrorInfo,
    Event,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentQueued,
    ExperimentRetried,
    ExperimentStarted,
    RunRecord,
)
from llem_dispatch.errors import (
    DockerOOMError,
    DockerTimeoutError,
    LlemError,
)
from llem_dispatch.gpu import GpuLease, GpuPool
from llem_dispatch.models import ExperimentFailure, hashed_config
from llem_dispatch.runners.protocol import Outcome, RunInfo, Runner, utcnow

__all__ = ["NO_RETRIES", "Dispatcher", "RetryPolicy"]

log = structlog.get_logger("llem_dispatch.dispatcher")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries for transient infrastructure errors only (daemon down, HTTP 5xx).

    Experiment failures are never retried; OOM and timeouts only when asked.
    The delay is capped exponential backoff with full jitter, and all waiting for
    one experiment is bounded by `max_wait_s`.
    """

    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_wait_s: float = 600.0
    jitter: bool = True
    retry_timeouts: bool = False
    retry_oom: bool = False

    def should_retry(self, exc: BaseException) -> bool:
        if isinstance(exc, DockerTimeoutError):
            return self.retry_timeouts
        if isinstance(exc, DockerOOMError):
            return self.retry_oom
        return bool(getattr(exc, "transient", False))

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return random.uniform(0, ceiling) if self.jitter else ceiling  # noqa: S311


NO_RETRIES = RetryPolicy(max_attempts=1)


class _Observer:
    """Tracks one attempt for the record; frees the GPUs the moment the run exits."""

    def __init__(
        self, dispatcher: Dispatcher, lease: GpuLease, record: dict[str, Any], attempt: int
    ) -> None:
        self._dispatcher = dispatcher
        self._lease = lease
        self._record = record
        self._attempt = attempt
        self.started_mono: float | None = None

    def on_started(self, info: RunInfo) -> None:
        self.started_mono = anyio.current_time()
        self._record.update(
            started_at=info.started_at,
            container_id=info.container_id,
            process_id=info.process_id,
            exchange_dir=info.exchange_dir,
            log_path=info.log_path,
            image=info.image,
            image_digest=info.image_digest,
        )
        self._dispatcher.emit(
            ExperimentStarted(
                self._record["config_hash"],
                tuple(self._lease),
                self._attempt,
                info.container_id,
                info.process_id,
                self._record["tags"],
            )
        )

    def on_exited(self, info: RunInfo) -> None:
        self._record["exited_at"] = info.exited_at
        self._lease.release()


class Dispatcher:
    """Runs experiments through a Runner with GPUs from a pool, concurrently.

    Use as `async with Dispatcher(runner, pool=pool) as d:`; `await d.run(config,
    gpus=k)` returns a `RunRecord`; `d.map(configs, gpus=k)` yields records as
    they finish. Closing the dispatcher closes its runner.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        pool: GpuPool | None = None,
        max_concurrency: int | None = None,
        retries: RetryPolicy | int | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.runner = runner
        self.runner_type: str | None = getattr(runner, "runner_type", None)
        self.pool = pool if pool is not None else GpuPool([])
        if retries is None:
            retries = RetryPolicy()
        elif isinstance(retries, int):
            retries = RetryPolicy(max_attempts=retries + 1)
        self.retries = retries
        self.max_concurrency = max_concurrency
        self._limiter = anyio.CapacityLimiter(max_concurrency or math.inf)
        self._subscribers: list[Callable[[Event], None]] = []
        if on_event is not None:
            self._subscribers.append(on_event)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the runner (idempotent)."""
        await self.runner.aclose()

    # -- events -----------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback` for every event; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def emit(self, event: Event) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception as exc:  # noqa: BLE001 - a broken display never stops a run
                log.warning("event_subscriber_failed", error=repr(exc))

    # -- running ----------------------------------------------------------------------

    def check_request(self, gpus: int) -> None:
        """Raise `GpuRequestError` at once for a request that can never be met."""
        self.pool.check_request(gpus)

    def parallelism(self) -> int:
        """How many experiments can usefully be in flight at once (sizes `map`'s workers)."""
        return self.max_concurrency or max(self.pool.size, 8)

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: int = 0,
        tags: Mapping[str, Any] | None = None,
    ) -> RunRecord:
        """Run one experiment on `gpus` GPUs; always returns a record.

        Raises only for a request that can never be met (`GpuRequestError`), bad
        configs (`ConfigError`) and cancellation.
        """
        data = hashed_config(config)
        config_hash = data.config_hash
        self.check_request(gpus)
        # A plain dict while running (cheap to update from the observer); the
        # RunRecord is built once at the end.
        record: dict[str, Any] = {
            "config_hash": config_hash,
            "config": data,
            "status": "error",
            "queued_at": utcnow(),
            "tags": dict(tags or {}),
            "runner_type": self.runner_type,
            "attempts": 0,
            "gpu_ids": [],
        }
        self.emit(ExperimentQueued(config_hash, gpus, record["tags"]))
        first_try = anyio.current_time()
        if self.max_concurrency is None:
            await self._attempts(data, gpus, record, first_try)
        else:
            async with self._limiter:
                await self._attempts(data, gpus, record, first_try)
        record["ended_at"] = utcnow()
        final = RunRecord.model_construct(**record)
        self.emit(ExperimentFinished(final) if final.ok else ExperimentFailed(final))
        return final

    async def _attempts(
        self, data: dict[str, Any], gpus: int, record: dict[str, Any], first_try: float
    ) -> None:
        """Attempt until success, a non-retryable error, or the retry budget is spent."""
        while True:
            record["attempts"] += 1
            try:
                outcome = await self._attempt(data, gpus, record)
            except LlemError as exc:
                waited = anyio.current_time() - first_try
                attempts = record["attempts"]
                if (
                    self.retries.should_retry(exc)
                    and attempts < self.retries.max_attempts
                    and waited < self.retries.max_wait_s
                ):
                    delay = min(
                        self.retries.delay(attempts),
                        max(0.0, self.retries.max_wait_s - waited),
                    )
                    log.warning(
                        "retrying",
                        config_hash=record["config_hash"],
                        attempt=attempts,
                        delay_s=round(delay, 2),
                        error=type(exc).__name__,
                        message=exc.message,
                        **record["tags"],
                    )
                    self.emit(
                        ExperimentRetried(
                            record["config_hash"],
                            attempts,
                            delay,
                            type(exc).__name__,
                            record["tags"],
                        )
                    )
                    await anyio.sleep(delay)
                    continue
                self._finish_error(record, exc)
                return
            except anyio.get_cancelled_exc_class():
                record["status"] = "cancelled"
                raise
            except Exception as exc:
                log.exception("unexpected_error", config_hash=record["config_hash"])
                self._finish_error(record, exc)
                return
            else:
                self._finish_outcome(record, outcome)
                return

    async def _attempt(self, data: dict[str, Any], gpus: int, record: dict[str, Any]) -> Outcome:
        async with self.pool.acquire(gpus) as lease:
            record["gpu_ids"] = list(lease)
            released = [self.pool.last_released(i) for i in lease]
            observer = _Observer(self, lease, record, record["attempts"])
            try:
                return await self.runner.run(data, gpus=tuple(lease), observer=observer)
            finally:
                known = [t for t in released if t is not None]
                if known and observer.started_mono is not None:
                    # From the GPUs' last release to this run's start on them.
                    record["handoff_gap_s"] = max(0.0, observer.started_mono - max(known))

    @staticmethod
    def _finish_outcome(record: dict[str, Any], outcome: Outcome) -> None:
        record["outcome"] = outcome
        if isinstance(outcome, ExperimentFailure):
            record.update(
                status="failed",
                failure=outcome,
                exchange_dir=outcome.exchange_dir,
                log_path=outcome.log_path,
            )
            return
        record.update(
            status="succeeded",
            result=outcome.model_dump(mode="json"),
            exchange_dir=None,
            log_path=None,
        )
        runner_meta = getattr(outcome, "runner", None)
        if runner_meta is not None and runner_meta.image_digest:
            record["image_digest"] = runner_meta.image_digest

    @staticmethod
    def _finish_error(record: dict[str, Any], exc: BaseException) -> None:
        record.update(status="error", error=ErrorInfo.from_exception(exc), exception=exc)
        if isinstance(exc, LlemError):
            record["exchange_dir"] = exc.exchange_dir or record.get("exchange_dir")
            record["container_id"] = getattr(exc, "container_id", None) or record.get(
                "container_id"
            )
            record["log_path"] = getattr(exc, "log_path", None) or record.get("log_path")

    async def map(
        self,
        configs: Iterable[BaseModel | Mapping[str, Any]],
        *,
        gpus: int = 0,
    ) -> AsyncIterator[RunRecord]:
        """Run every config; yield records as they finish (not in input order).

        Wrap in `contextlib.aclosing(...)` when you may stop iterating early: closing
        the iterator cancels the runs still in flight and removes their containers.
        """
        items = list(configs)
        self.check_request(gpus)

        async def one(config: BaseModel | Mapping[str, Any]) -> RunRecord:
            return await self.run(config, gpus=gpus)

        workers = min(len(items), 2 * self.parallelism())
        async with contextlib.aclosing(fan_out(items, one, workers=workers)) as records:
            async for record in records:
                yield record
