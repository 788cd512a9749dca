"""Several hosts: the Ray backend (placement of attempts on a cluster's nodes)."""

from llem_dispatch.cluster.dispatcher import RayDispatcher, sweep_orphans
from llem_dispatch.cluster.hosts import NodeCheck, NodeSweep, check_cluster, sweep_cluster
from llem_dispatch.cluster.node import NodeContext, RunnerFactory
from llem_dispatch.cluster.placement import RayPlacement
from llem_dispatch.cluster.settings import RaySettings

__all__ = [
    "NodeCheck",
    "NodeContext",
    "NodeSweep",
    "RayDispatcher",
    "RayPlacement",
    "RaySettings",
    "RunnerFactory",
    "check_cluster",
    "sweep_cluster",
    "sweep_orphans",
]
