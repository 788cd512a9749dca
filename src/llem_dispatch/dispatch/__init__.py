"""Dispatch: GPUs, concurrency, retries and events around a Runner; the RunRecord."""

from llem_dispatch.dispatch.dispatcher import NO_RETRIES, Dispatcher, RetryPolicy
from llem_dispatch.dispatch.records import (
    ErrorInfo,
    Event,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentQueued,
    ExperimentRetried,
    ExperimentStarted,
    NodeInfo,
    RunRecord,
    RunStatus,
)

__all__ = [
    "NO_RETRIES",
    "Dispatcher",
    "ErrorInfo",
    "Event",
    "ExperimentFailed",
    "ExperimentFinished",
    "ExperimentQueued",
    "ExperimentRetried",
    "ExperimentStarted",
    "NodeInfo",
    "RetryPolicy",
    "RunRecord",
    "RunStatus",
]
