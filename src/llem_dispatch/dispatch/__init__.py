"""Dispatch: concurrency, retries and events around a placement; the RunRecord."""

from llem_dispatch.dispatch.dispatcher import NO_RETRIES, Dispatcher, RetryPolicy
from llem_dispatch.dispatch.placement import LocalPlacement, Placement
from llem_dispatch.dispatch.records import (
    ErrorInfo,
    Event,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentQueued,
    ExperimentRetried,
    ExperimentStarted,
    GpuAtStart,
    NodeInfo,
    RecordDraft,
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
    "GpuAtStart",
    "LocalPlacement",
    "NodeInfo",
    "Placement",
    "RecordDraft",
    "RetryPolicy",
    "RunRecord",
    "RunStatus",
]
