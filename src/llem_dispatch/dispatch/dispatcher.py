"""The Dispatcher: concurrency, retries, events and records around a placement.

Policy lives here; a placement (by default this host's GPU pool and a Runner)
only runs one attempt. Every run ends as a `RunRecord`, whatever happened, so
one failure never cancels the others.
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
from llem_dispatch.dispatch.placement import LocalPlacement, Placement
from llem_dispatch.dispatch.records import (
    ErrorInfo,
    Event,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentQueued,
    ExperimentRetried,
    ExperimentStarted,
    RecordDraft,
    RunRecord,
)
from llem_dispatch.errors import (
    ExperimentOOMError,
    ExperimentTimeoutError,
    GpuRequestError,
    LlemError,
)
from llem_dispatch.gpu import GpuPool
from llem_dispatch.models import ExperimentFailure, HashedConfig, hashed_config
from llem_dispatch.runners.protocol import Outcome, Runner, utcnow

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
        """Whether `exc` is worth another attempt at all (budget aside)."""
        # The neutral classes: a local run's timeout is a timeout as a container's is.
        if isinstance(exc, ExperimentTimeoutError):
            return self.retry_timeouts
        if isinstance(exc, ExperimentOOMError):
            return self.retry_oom
        return bool(getattr(exc, "transient", False))

    def delay(self, attempt: int) -> float:
        """The backoff after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return random.uniform(0, ceiling) if self.jitter else ceiling  # noqa: S311

    def next_delay(self, exc: BaseException, attempts: int, waited_s: float) -> float | None:
        """Seconds to wait before attempt `attempts + 1` after `exc`, or None to give up."""
        if not self.should_retry(exc) or attempts >= self.max_attempts:
            return None
        if waited_s >= self.max_wait_s:
            return None
        return min(self.delay(attempts), max(0.0, self.max_wait_s - waited_s))


NO_RETRIES = RetryPolicy(max_attempts=1)


class Dispatcher:
    """Runs experiments concurrently, each attempt through a placement.

    Use as `async with Dispatcher(runner, pool=pool) as d:`; `await d.run(config,
    gpus=k)` returns a `RunRecord`; `d.map(configs, gpus=k)` yields records as
    they finish. `runner` and `pool` make a `LocalPlacement` (this host); give
    `placement=` instead to run attempts elsewhere. `prestart=True` (local only)
    starts an experiment's container while its GPUs are still busy, held at a
    gate until they free (see `LocalPlacement`). Closing the dispatcher closes
    its placement (and so the runner).
    """

    def __init__(
        self,
        runner: Runner | None = None,
        *,
        pool: GpuPool | None = None,
        placement: Placement | None = None,
        max_concurrency: int | None = None,
        retries: RetryPolicy | int | None = None,
        on_event: Callable[[Event], None] | None = None,
        prestart: bool = False,
    ) -> None:
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.placement = _placement(runner, pool, placement, prestart=prestart)
        local = self.placement if isinstance(self.placement, LocalPlacement) else None
        #: The runner and GPU pool of a local placement (None for any other).
        self.runner: Runner | None = local.runner if local else None
        self.pool: GpuPool | None = local.pool if local else None
        self.runner_type: str | None = self.placement.runner_type
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
        """Close the placement, and with it the runner (idempotent)."""
        await self.placement.aclose()

    # -- events -----------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback` for every event; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def emit(self, event: Event) -> None:
        """Pass `event` to every subscriber; a failing subscriber is logged, not raised."""
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception as exc:  # noqa: BLE001 - a broken display never stops a run
                log.warning("event_subscriber_failed", error=repr(exc))

    # -- running ----------------------------------------------------------------------

    def check_request(self, gpus: int) -> None:
        """Raise `GpuRequestError` at once for a request that can never be met.

        The count itself is checked here, for every placement (a study's counts
        were checked at load); a placement checks only what it has.
        """
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise GpuRequestError(
                f"the number of GPUs must be a whole number >= 0, got {gpus!r}",
                fix_suggestion="Pass gpus=0 (no GPU) or a positive whole number.",
            )
        self.placement.check_request(gpus)

    def parallelism(self) -> int:
        """How many experiments can usefully be in flight at once (sizes `map`'s workers)."""
        return self.max_concurrency or self.placement.parallelism()

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
        self.check_request(gpus)
        draft = RecordDraft(
            config_hash=data.config_hash,
            config=data,
            queued_at=utcnow(),
            tags=dict(tags or {}),
            runner_type=self.runner_type,
        )
        self.emit(ExperimentQueued(draft.config_hash, gpus, draft.tags))
        first_try = anyio.current_time()
        if self.max_concurrency is None:
            await self._attempts(data, gpus, draft, first_try)
        else:
            async with self._limiter:
                await self._attempts(data, gpus, draft, first_try)
        draft.ended_at = utcnow()
        record = draft.build()
        self.emit(ExperimentFinished(record) if record.ok else ExperimentFailed(record))
        return record

    async def _attempts(
        self, data: HashedConfig, gpus: int, draft: RecordDraft, first_try: float
    ) -> None:
        """Attempt until success, a non-retryable error, or the retry budget is spent."""

        def started() -> None:
            self.emit(
                ExperimentStarted(
                    draft.config_hash,
                    tuple(draft.gpu_ids),
                    draft.attempts,
                    draft.container_id,
                    draft.process_id,
                    draft.tags,
                    draft.node.label if draft.node is not None else None,
                )
            )

        while True:
            draft.attempts += 1
            try:
                outcome = await self.placement.attempt(data, gpus, draft, started)
            except LlemError as exc:
                waited = anyio.current_time() - first_try
                delay = self.retries.next_delay(exc, draft.attempts, waited)
                if delay is None:
                    _record_error(draft, exc)
                    return
                self._retrying(draft, exc, delay)
                await anyio.sleep(delay)
            except anyio.get_cancelled_exc_class():
                draft.status = "cancelled"
                raise
            except Exception as exc:
                log.exception("unexpected_error", config_hash=draft.config_hash)
                _record_error(draft, exc)
                return
            else:
                _record_outcome(draft, outcome)
                return

    def _retrying(self, draft: RecordDraft, exc: LlemError, delay: float) -> None:
        log.warning(
            "retrying",
            config_hash=draft.config_hash,
            attempt=draft.attempts,
            delay_s=round(delay, 2),
            error=type(exc).__name__,
            message=exc.message,
            **draft.tags,
        )
        self.emit(
            ExperimentRetried(
                draft.config_hash, draft.attempts, delay, type(exc).__name__, draft.tags
            )
        )

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


def _placement(
    runner: Runner | None,
    pool: GpuPool | None,
    placement: Placement | None,
    *,
    prestart: bool,
) -> Placement:
    """The placement the constructor's arguments describe (a runner and pool, or one given)."""
    if placement is None:
        if runner is None:
            raise TypeError("Dispatcher needs a runner (and a pool) or a placement")
        return LocalPlacement(runner, pool, prestart=prestart)
    if runner is not None or pool is not None:
        raise TypeError("give Dispatcher a runner and pool, or a placement, not both")
    if prestart:
        raise TypeError("prestart= is a LocalPlacement option: pass it to the placement")
    return placement


def _record_outcome(draft: RecordDraft, outcome: Outcome) -> None:
    draft.outcome = outcome
    if isinstance(outcome, ExperimentFailure):
        draft.status = "failed"
        draft.failure = outcome
        draft.exchange_dir = outcome.exchange_dir
        draft.log_path = outcome.log_path
        return
    draft.status = "succeeded"
    draft.result = outcome.model_dump(mode="json")
    draft.exchange_dir = None
    draft.log_path = None
    runner_meta = getattr(outcome, "runner", None)
    if runner_meta is not None and runner_meta.image_digest:
        draft.image_digest = runner_meta.image_digest


def _record_error(draft: RecordDraft, exc: BaseException) -> None:
    draft.status = "error"
    draft.error = ErrorInfo.from_exception(exc)
    draft.exception = exc
    if isinstance(exc, LlemError):
        draft.exchange_dir = exc.exchange_dir or draft.exchange_dir
        draft.container_id = getattr(exc, "container_id", None) or draft.container_id
        draft.log_path = getattr(exc, "log_path", None) or draft.log_path
