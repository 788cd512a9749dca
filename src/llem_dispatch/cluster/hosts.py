"""Per-host work on a Ray cluster: the preflight checks and the sweep of orphans.

Nodes sharing a host share its Docker daemon, so each of these runs one small
task per host, pinned to one of its nodes, and gathers what every host answered
within a time limit (a lost node never stops the others).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from llem_dispatch import _labels
from llem_dispatch.cluster.connection import RayConnection, node_resource
from llem_dispatch.cluster.node import remote_task
from llem_dispatch.dispatch import NodeInfo
from llem_dispatch.errors import ClusterError
from llem_dispatch.runners.kinds import AUTO, RunnerKind, decide_kind

__all__ = [
    "NodeCheck",
    "NodeSweep",
    "check_cluster",
    "on_each_host",
    "preflight_hosts",
    "sweep_cluster",
    "sweep_hosts",
    "unready_error",
]

log = structlog.get_logger("llem_dispatch.cluster")


@dataclass(frozen=True, slots=True)
class NodeCheck:
    """What `RayDispatcher.preflight` found on one host."""

    node: NodeInfo
    #: Whether each engine the study's runner kinds need answers there, by kind name.
    engines: dict[str, bool]
    missing_images: list[str]
    missing_paths: list[str]

    def kind(self, runner: str, *, has_image: bool) -> RunnerKind:
        """The kind `runner` (a name or `auto`) means on this host, by its answers."""
        return decide_kind(
            runner,
            has_image=has_image,
            probe=lambda kind: self.engines.get(kind.name, False),
            quiet=True,
        )


@dataclass(frozen=True, slots=True)
class NodeSweep:
    """What `sweep_cluster` did on one host."""

    node: NodeInfo
    reaped: list[dict[str, Any]]
    skipped: str | None


async def on_each_host(
    nodes: list[dict[str, Any]], task: str, args: tuple[Any, ...], timeout_s: float
) -> list[dict[str, Any]]:
    """Run one of the node tasks once per host (pinned to one of its nodes); gather."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    by_host: dict[str, str] = {}
    for node in nodes:
        by_host.setdefault(str(node.get("NodeManagerHostname", node["NodeID"])), node["NodeID"])
    refs = [
        remote_task(task)
        .options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
        .remote(*args)
        for node_id in by_host.values()
    ]
    out: list[dict[str, Any]] = []
    with anyio.move_on_after(timeout_s):
        for ref in refs:
            try:
                out.append(await ref)
            except Exception as exc:  # noqa: BLE001 - one lost node must not stop the others
                log.warning(f"{task}_node_failed", error=f"{type(exc).__name__}: {exc}"[:300])
    return out


async def preflight_hosts(
    connection: RayConnection,
    *,
    runner: str = AUTO,
    images: Sequence[str] = (),
    paths: Sequence[str] = (),
    gpus: int = 0,
    num_cpus: float = 1.0,
    timeout_s: float = 60.0,
) -> list[NodeCheck]:
    """On each host that could run an experiment of `gpus` GPUs: engines, images, paths.

    `runner` is a kind's name or `auto`. A host counts when one of its nodes has
    `gpus` GPUs and `num_cpus` CPUs.
    """
    nodes = [
        n
        for n in connection.nodes()
        if node_resource(n, "GPU") >= gpus and node_resource(n, "CPU") >= num_cpus
    ]
    args = (runner, list(images), list(paths))
    found = await on_each_host(nodes, "preflight", args, timeout_s)
    return [
        NodeCheck(
            NodeInfo.model_validate(f["node"]),
            f["engines"],
            f["missing_images"],
            f["missing_paths"],
        )
        for f in found
    ]


def unready_error(
    checks: Sequence[NodeCheck], *, runner_kind: str, folder: str, has_image: bool = True
) -> ClusterError | None:
    """One `ClusterError` naming every problem the checks found, or None if there is none.

    `runner_kind` is a kind's name or `auto` (decided per host by its answers);
    `folder` is the study folder a host-process kind needs on every host.
    """
    problems: list[str] = []
    for check in checks:
        where = f"node {check.node.label} ({check.node.ip})"
        kind = check.kind(runner_kind, has_image=has_image)
        if kind.needs_engine and not check.engines.get(kind.name, False):
            problems.append(f"{where}: no {kind.engine} answers there")
        elif kind.needs_image:
            problems += [f"{where}: image {i} is not there" for i in check.missing_images]
        elif kind.uses_study_folder and check.missing_paths:
            problems.append(f"{where}: the study folder {folder} does not exist there")
    if not problems:
        return None
    return ClusterError(
        f"{len(problems)} problem(s) on the cluster's nodes; nothing was run:\n  "
        + "\n  ".join(problems),
        fix_suggestion="Build or pull the image on each node named (or push it to a "
        "registry they reach), start Docker there, or copy the study folder to the "
        "same path; then run again.",
    )


async def sweep_hosts(
    connection: RayConnection,
    *,
    results_dir: str | Path | None = None,
    logs_dir: str | Path | None = None,
    study_over: bool = False,
    dry_run: bool = False,
    timeout_s: float = 120.0,
) -> list[NodeSweep]:
    """Reap orphaned containers on every host of the cluster (see `sweep_cluster`)."""
    args = (
        str(Path(results_dir).resolve()) if results_dir is not None else None,
        str(logs_dir) if logs_dir is not None else None,
        study_over,
        dry_run,
        _labels.HOSTNAME,
    )
    return [
        NodeSweep(NodeInfo.model_validate(d["node"]), d["reaped"], d["skipped"])
        for d in await on_each_host(connection.nodes(), "sweep", args, timeout_s)
    ]


async def sweep_cluster(
    address: str | None,
    *,
    results_dir: str | Path | None = None,
    logs_dir: str | Path | None = None,
    study_over: bool = False,
    dry_run: bool = False,
    timeout_s: float = 120.0,
) -> list[NodeSweep]:
    """`reap` on every host of a Ray cluster: remove containers whose owner is gone.

    Runs one small task per host, pinned to a node there. With `study_over=True`
    (and `results_dir`), every container of that study is removed, owner alive or
    not: used at the end of a cluster study, when nothing of it is in flight.
    """
    connection = RayConnection(address)
    try:
        return await sweep_hosts(
            connection,
            results_dir=results_dir,
            logs_dir=logs_dir,
            study_over=study_over,
            dry_run=dry_run,
            timeout_s=timeout_s,
        )
    finally:
        connection.close()


async def check_cluster(
    address: str | None,
    *,
    runner: str = AUTO,
    images: Sequence[str] = (),
    paths: Sequence[str] = (),
    timeout_s: float = 60.0,
) -> tuple[dict[str, int], list[NodeCheck]]:
    """GPUs per node, and on every host: `runner`'s engines, `images` and `paths` present."""
    connection = RayConnection(address)
    try:
        gpus = connection.cluster_gpus()
        found = await preflight_hosts(
            connection,
            runner=runner,
            images=images,
            paths=paths,
            num_cpus=1.0,
            timeout_s=timeout_s,
        )
        return gpus, found
    finally:
        connection.close()
