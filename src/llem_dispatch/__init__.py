"""llem-dispatch: run GPU experiment sweeps, one ephemeral container per experiment.

The public surface; everything else is private and may change.
"""

from llem_dispatch.cluster import NodeContext, RayDispatcher
from llem_dispatch.dispatcher import Dispatcher, NodeInfo, RetryPolicy, RunRecord
from llem_dispatch.errors import (
    ClusterError,
    ClusterNodeLostError,
    ConfigError,
    DockerContainerError,
    DockerError,
    DockerGPUAccessError,
    DockerHangError,
    DockerImagePullError,
    DockerOOMError,
    DockerPermissionError,
    DockerTimeoutError,
    DockerUnavailableError,
    GpuRequestError,
    LlemError,
    ResultError,
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
from llem_dispatch.runners import DockerRunner, LocalRunner, Outcome, RunInfo, Runner, RunObserver
from llem_dispatch.study import Study, StudySummary, load_study, run_study

__all__ = [
    "ClusterError",
    "ClusterNodeLostError",
    "ConfigError",
    "Dispatcher",
    "DockerContainerError",
    "DockerError",
    "DockerGPUAccessError",
    "DockerHangError",
    "DockerImagePullError",
    "DockerOOMError",
    "DockerPermissionError",
    "DockerRunner",
    "DockerTimeoutError",
    "DockerUnavailableError",
    "ExperimentFailure",
    "ExperimentResult",
    "GpuLease",
    "GpuPool",
    "GpuRequestError",
    "LlemError",
    "LocalRunner",
    "NodeContext",
    "NodeInfo",
    "Outcome",
    "RayDispatcher",
    "ResultError",
    "RetryPolicy",
    "RunInfo",
    "RunObserver",
    "RunRecord",
    "Runner",
    "RunnerMetadata",
    "Study",
    "StudySummary",
    "capture_stderr_snippet",
    "compute_config_hash",
    "load_study",
    "run_study",
    "translate_docker_error",
]

__version__ = "0.1.0"
