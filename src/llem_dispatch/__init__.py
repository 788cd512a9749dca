"""llem-dispatch: run GPU experiment sweeps, one ephemeral container per experiment.

The public surface; everything else is private and may change. Names are
imported on first use (PEP 562), so `import llem_dispatch` costs milliseconds
and pulls in neither Docker's client nor Ray until they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "ClusterError",
    "ClusterJobCancelledError",
    "ClusterNodeLostError",
    "ConfigError",
    "Dispatcher",
    "DockerContainerError",
    "DockerDaemonHungError",
    "DockerError",
    "DockerGPUAccessError",
    "DockerHangError",
    "DockerImagePullError",
    "DockerOOMError",
    "DockerPermissionError",
    "DockerRunner",
    "DockerTimeoutError",
    "DockerUnavailableError",
    "EngineHungError",
    "EnginePermissionError",
    "EngineUnavailableError",
    "ExperimentExitError",
    "ExperimentFailure",
    "ExperimentHangError",
    "ExperimentOOMError",
    "ExperimentResult",
    "ExperimentStartError",
    "ExperimentTimeoutError",
    "GpuAccessError",
    "GpuLease",
    "GpuPool",
    "GpuRequestError",
    "ImageError",
    "LlemError",
    "LocalPlacement",
    "LocalRunner",
    "NodeContext",
    "NodeInfo",
    "Outcome",
    "Placement",
    "PlacementRequest",
    "PodmanContainerError",
    "PodmanError",
    "PodmanGPUAccessError",
    "PodmanHangError",
    "PodmanImagePullError",
    "PodmanOOMError",
    "PodmanPermissionError",
    "PodmanServiceHungError",
    "PodmanTimeoutError",
    "PodmanUnavailableError",
    "RayDispatcher",
    "RayPlacement",
    "RaySettings",
    "ResultError",
    "ResultsDirBusyError",
    "RetryPolicy",
    "RunInfo",
    "RunObserver",
    "RunRecord",
    "Runner",
    "RunnerError",
    "RunnerKind",
    "RunnerMetadata",
    "RunnerOptions",
    "SlurmPlacement",
    "SlurmSettings",
    "Study",
    "StudySummary",
    "capture_stderr_snippet",
    "compute_config_hash",
    "load_results",
    "load_stats",
    "load_study",
    "register_placement",
    "register_runner_kind",
    "run_study",
    "runner_kinds",
    "translate_docker_error",
]

__version__ = "0.1.0"

#: Where each public name lives (module under llem_dispatch).
_HOMES = {
    **dict.fromkeys(("NodeContext", "RayDispatcher", "RayPlacement", "RaySettings"), "cluster"),
    **dict.fromkeys(
        (
            "Dispatcher",
            "LocalPlacement",
            "NodeInfo",
            "Placement",
            "PlacementRequest",
            "RetryPolicy",
            "RunRecord",
            "register_placement",
        ),
        "dispatch",
    ),
    **dict.fromkeys(("GpuLease", "GpuPool"), "gpu"),
    **dict.fromkeys(("SlurmPlacement", "SlurmSettings"), "slurm"),
    **dict.fromkeys(
        ("ExperimentFailure", "ExperimentResult", "RunnerMetadata", "compute_config_hash"),
        "models",
    ),
    **dict.fromkeys(
        (
            "DockerRunner",
            "LocalRunner",
            "Outcome",
            "RunInfo",
            "RunObserver",
            "Runner",
            "RunnerKind",
            "RunnerOptions",
            "register_runner_kind",
            "runner_kinds",
        ),
        "runners",
    ),
    **dict.fromkeys(("Study", "StudySummary", "load_study", "run_study"), "study"),
    **dict.fromkeys(("load_results", "load_stats"), "report"),
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'llem_dispatch' has no attribute {name!r}")
    module = importlib.import_module(f"llem_dispatch.{_HOMES.get(name, 'errors')}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from llem_dispatch.cluster import NodeContext, RayDispatcher, RayPlacement, RaySettings
    from llem_dispatch.dispatch import (
        Dispatcher,
        LocalPlacement,
        NodeInfo,
        Placement,
        PlacementRequest,
        RetryPolicy,
        RunRecord,
        register_placement,
    )
    from llem_dispatch.errors import (
        ClusterError,
        ClusterJobCancelledError,
        ClusterNodeLostError,
        ConfigError,
        DockerContainerError,
        DockerDaemonHungError,
        DockerError,
        DockerGPUAccessError,
        DockerHangError,
        DockerImagePullError,
        DockerOOMError,
        DockerPermissionError,
        DockerTimeoutError,
        DockerUnavailableError,
        EngineHungError,
        EnginePermissionError,
        EngineUnavailableError,
        ExperimentExitError,
        ExperimentHangError,
        ExperimentOOMError,
        ExperimentStartError,
        ExperimentTimeoutError,
        GpuAccessError,
        GpuRequestError,
        ImageError,
        LlemError,
        PodmanContainerError,
        PodmanError,
        PodmanGPUAccessError,
        PodmanHangError,
        PodmanImagePullError,
        PodmanOOMError,
        PodmanPermissionError,
        PodmanServiceHungError,
        PodmanTimeoutError,
        PodmanUnavailableError,
        ResultError,
        ResultsDirBusyError,
        RunnerError,
        capture_stderr_snippet,
        translate_docker_error,
    )
    from llem_dispatch.gpu import GpuLease, GpuPool
    from llem_dispatch.models import (
        ExperimentFailure,
        ExperimentResult,
        RunnerMetadata,
        compute_config_hash,
    )
    from llem_dispatch.report import load_results, load_stats
    from llem_dispatch.runners import (
        DockerRunner,
        LocalRunner,
        Outcome,
        RunInfo,
        Runner,
        RunnerKind,
        RunnerOptions,
        RunObserver,
        register_runner_kind,
        runner_kinds,
    )
    from llem_dispatch.slurm import SlurmPlacement, SlurmSettings
    from llem_dispatch.study import Study, StudySummary, load_study, run_study
