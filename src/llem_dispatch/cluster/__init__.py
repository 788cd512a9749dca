"""Several hosts: the Ray backend (placement of attempts on a cluster's nodes).

Exports lazily: the study schema (`cluster.settings`) imports neither Ray's
placement nor the Docker client that the node side uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

_HOMES = {
    "NodeCheck": "hosts",
    "NodeContext": "node",
    "NodeSweep": "hosts",
    "RayDispatcher": "dispatcher",
    "RayPlacement": "placement",
    "RaySettings": "settings",
    "RunnerFactory": "node",
    "check_cluster": "hosts",
    "sweep_cluster": "hosts",
    "sweep_orphans": "dispatcher",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'llem_dispatch.cluster' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llem_dispatch.cluster.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from llem_dispatch.cluster.dispatcher import RayDispatcher, sweep_orphans
    from llem_dispatch.cluster.hosts import NodeCheck, NodeSweep, check_cluster, sweep_cluster
    from llem_dispatch.cluster.node import NodeContext, RunnerFactory
    from llem_dispatch.cluster.placement import RayPlacement
    from llem_dispatch.cluster.settings import RaySettings
