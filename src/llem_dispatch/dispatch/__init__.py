"""Dispatch: concurrency, retries and events around a placement (by name); the RunRecord."""

from llem_dispatch.dispatch.dispatcher import NO_RETRIES, Dispatcher, RetryPolicy
from llem_dispatch.dispatch.placement import (
    HostContext,
    HostGpus,
    HostNeeds,
    HostRunnerFactory,
    LocalPlacement,
    Placement,
    PlacementRequest,
    ThisHost,
)
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
from llem_dispatch.dispatch.registry import (
    known_placements,
    placement_class,
    placement_names,
    register_placement,
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
    "HostContext",
    "HostGpus",
    "HostNeeds",
    "HostRunnerFactory",
    "LocalPlacement",
    "NodeInfo",
    "Placement",
    "PlacementRequest",
    "RecordDraft",
    "RetryPolicy",
    "RunRecord",
    "RunStatus",
    "ThisHost",
    "known_placements",
    "placement_class",
    "placement_names",
    "register_placement",
]
