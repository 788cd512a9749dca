"""Several hosts: a `Dispatcher` whose attempts run on a Ray cluster (the `ray` extra).

`RayDispatcher` is the local `Dispatcher` (its `run`, `map`, events, `RunRecord`,
retries and concurrency cap) over a `RayPlacement`, plus what a cluster study
needs before and after (the placement's own per-host preflight checks and sweep
of orphaned containers). On the node where an attempt lands, the task:

1. builds the configured runner there from a picklable factory (DockerRunner
   against that node's own daemon, or LocalRunner), handing it the GPU ids Ray
   assigned, which are that node's own device ids;
2. runs the experiment in a private event loop and streams 'started', 'exited'
   and the outcome back as they happen (a streaming-generator task);
3. keeps its GPUs past the container's exit until the cooldown (counted from the
   end of its work, its `done` mark, else from the exit) is over, so Ray cannot
   give them to the next experiment early (the driver has the result by then).

Results travel back only as JSON and are recorded by the driver, so nothing is
recorded twice. Containers left by a dead worker are swept per host by
`sweep_cluster` / `sweep_orphans`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog
from pydantic import BaseModel

from llem_dispatch.cluster.hosts import NodeCheck, NodeSweep
from llem_dispatch.cluster.node import RunnerFactory
from llem_dispatch.cluster.placement import RayPlacement
from llem_dispatch.dispatch import Dispatcher, Event, RetryPolicy
from llem_dispatch.gpu import SettleSpec
from llem_dispatch.models import ExperimentResult
from llem_dispatch.runners.kinds import AUTO

__all__ = ["RayDispatcher", "sweep_orphans"]

log = structlog.get_logger("llem_dispatch.cluster")


class RayDispatcher(Dispatcher):
    """A `Dispatcher` whose experiments run as Ray tasks across a cluster's nodes.

    `runner_factory(NodeContext) -> Runner` is shipped to the nodes and called
    there for every attempt. Results are validated with `result_model` on the
    driver. `address` is Ray's (`"auto"`, `"HOST:6379"`, `"ray://HOST:10001"`);
    an already initialised Ray is used as it is, and None starts a local one.
    """

    placement: RayPlacement

    def __init__(
        self,
        runner_factory: RunnerFactory,
        *,
        address: str | None = None,
        cooldown_s: float = 0.0,
        max_concurrency: int | None = None,
        retries: RetryPolicy | int | None = None,
        on_event: Callable[[Event], None] | None = None,
        result_model: type[BaseModel] = ExperimentResult,
        runner_type: str = "ray",
        num_cpus: float = 1.0,
        runtime_env: Mapping[str, Any] | None = None,
        cancel_timeout_s: float = 60.0,
        placement_timeout_s: float = 300.0,
        init_options: Mapping[str, Any] | None = None,
        settle: SettleSpec | None = None,
    ) -> None:
        placement = RayPlacement(
            runner_factory,
            address=address,
            cooldown_s=cooldown_s,
            result_model=result_model,
            runner_type=runner_type,
            num_cpus=num_cpus,
            runtime_env=runtime_env,
            cancel_timeout_s=cancel_timeout_s,
            placement_timeout_s=placement_timeout_s,
            init_options=init_options,
            settle=settle,
        )
        super().__init__(
            placement=placement,
            max_concurrency=max_concurrency,
            retries=retries,
            on_event=on_event,
        )

    def connect(self) -> ModuleType:
        """Connect to the cluster (once); raise `ClusterError` saying how to fix it."""
        return self.placement.connect()

    def nodes(self, *, max_age_s: float = 2.0) -> list[dict[str, Any]]:
        """Ray's view of the alive nodes (cached briefly: every `run` checks its request)."""
        return self.placement.connection.nodes(max_age_s=max_age_s)

    def cluster_gpus(self, *, max_age_s: float = 2.0) -> dict[str, int]:
        """GPUs per alive node, by node label (the node view at most `max_age_s` old)."""
        return self.placement.connection.cluster_gpus(max_age_s=max_age_s)

    async def preflight(
        self,
        *,
        runner: str = AUTO,
        images: Sequence[str] = (),
        paths: Sequence[str] = (),
        gpus: int = 0,
        timeout_s: float = 60.0,
    ) -> list[NodeCheck]:
        """On each host that could run an experiment of `gpus` GPUs: the engines of
        `runner` (a kind's name or `auto`), images, paths."""
        return await self.placement.preflight(
            runner=runner, images=images, paths=paths, gpus=gpus, timeout_s=timeout_s
        )

    async def require_ready(
        self,
        *,
        images: Sequence[str],
        paths: Sequence[str],
        runner_kind: str,
        gpus: int = 0,
    ) -> None:
        """Before anything runs: can every host that may get an experiment run it?

        `runner_kind` is a kind's name or `auto` (decided on each host).
        Raises one `ClusterError` naming every problem on every node.
        """
        await self.placement.require_ready(
            images=images, paths=paths, runner_kind=runner_kind, gpus=gpus
        )

    async def sweep(
        self,
        *,
        results_dir: str | Path | None = None,
        logs_dir: str | Path | None = None,
        study_over: bool = False,
        dry_run: bool = False,
        timeout_s: float = 120.0,
    ) -> list[NodeSweep]:
        """Reap orphaned containers on every host of the cluster (see `sweep_cluster`)."""
        return await self.placement.sweep_hosts(
            results_dir=results_dir,
            logs_dir=logs_dir,
            study_over=study_over,
            dry_run=dry_run,
            timeout_s=timeout_s,
        )


async def sweep_orphans(
    dispatcher: RayDispatcher, results: Path, *, study_over: bool, timeout_s: float = 60
) -> None:
    """Reap a study's orphaned containers on every host, logging each (logs kept)."""
    await dispatcher.placement.sweep_study(results, study_over=study_over, timeout_s=timeout_s)
