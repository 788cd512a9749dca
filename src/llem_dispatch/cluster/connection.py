"""The driver's connection to a Ray cluster: the address check, connecting, the node view.

`RayConnection` connects once (failing in seconds, with the fix, on an address
nothing listens at), lists the alive nodes and their GPUs, and shuts Ray down on
close only when it started it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from llem_dispatch.cluster.node import require_ray
from llem_dispatch.dispatch import NodeInfo
from llem_dispatch.errors import ClusterError

__all__ = ["CLUSTER_FIX", "RayConnection", "node_label", "node_resource", "probe_address"]

#: What to do when the cluster cannot be reached.
CLUSTER_FIX = (
    "Start the cluster (`ray start --head` on the head node, `ray start --address "
    "HEAD:6379` on each other node), then pass the head's address to --ray / `cluster:`; "
    "`ray status` shows what is up."
)


def probe_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail in seconds on an address nothing listens at (ray.init retries for minutes)."""
    if not address or address in {"auto", "local"}:
        return
    hostport = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(
            f"Ray address {address!r} is not HOST:PORT, ray://HOST:PORT or auto",
            fix_suggestion="Give the head node's address, e.g. 10.0.0.5:6379.",
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ClusterError(
            f"nothing answers at the Ray address {address!r}: {exc.strerror or exc}",
            fix_suggestion=CLUSTER_FIX,
        ) from exc


def node_resource(node: Mapping[str, Any], name: str) -> float:
    """One resource of a node as `ray.nodes()` lists it (0 when it has none)."""
    return float(node.get("Resources", {}).get(name, 0))


def node_label(node: Mapping[str, Any]) -> str:
    """A node of `ray.nodes()` by its short label, 'host[1a2b3c]'."""
    hostname = str(node.get("NodeManagerHostname", "?"))
    return NodeInfo(hostname=hostname, node_id=node["NodeID"]).label


class RayConnection:
    """Connects to the Ray cluster at `address` on first use; lists its alive nodes.

    `address` is Ray's (`"auto"`, `"HOST:6379"`, `"ray://HOST:10001"`); an already
    initialised Ray is used as it is, and None starts a local one.
    """

    def __init__(self, address: str | None, init_options: Mapping[str, Any] | None = None) -> None:
        self.address = address
        self.init_options = dict(init_options or {})
        self._owns_ray = False
        self._nodes_cache: tuple[float, list[dict[str, Any]]] = (float("-inf"), [])

    def connect(self) -> ModuleType:
        """Connect to the cluster (once); raise `ClusterError` saying how to fix it."""
        ray = require_ray()
        if ray.is_initialized():
            return ray
        options: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING"}
        options.update(self.init_options)
        probe_address(self.address)
        try:
            ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(
                f"cannot connect to the Ray cluster at {self.address!r}: {exc}",
                fix_suggestion=CLUSTER_FIX,
            ) from exc
        self._owns_ray = True
        return ray

    def nodes(self, *, max_age_s: float = 2.0) -> list[dict[str, Any]]:
        """Ray's view of the alive nodes (cached briefly: every `run` checks its request)."""
        ray = self.connect()
        taken, nodes = self._nodes_cache
        if time.monotonic() - taken > max_age_s:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            self._nodes_cache = (time.monotonic(), nodes)
        return nodes

    def cluster_gpus(self, *, max_age_s: float = 2.0) -> dict[str, int]:
        """GPUs per alive node, by node label (the node view at most `max_age_s` old)."""
        return {
            node_label(n): int(node_resource(n, "GPU")) for n in self.nodes(max_age_s=max_age_s)
        }

    def close(self) -> None:
        """Shut Ray down if this connection started it (idempotent)."""
        if self._owns_ray:
            self._owns_ray = False
            require_ray().shutdown()
