"""Several hosts: the Ray backend (placement of attempts on a cluster's nodes)."""

from llem_dispatch.cluster.dispatcher import (
    NodeCheck,
    NodeContext,
    NodeSweep,
    RayDispatcher,
    RunnerFactory,
    check_cluster,
    sweep_cluster,
    sweep_orphans,
)

__all__ = [
    "NodeCheck",
    "NodeContext",
    "NodeSweep",
    "RayDispatcher",
    "RunnerFactory",
    "check_cluster",
    "sweep_cluster",
    "sweep_orphans",
]
