"""The Ray placement: each attempt of an experiment as one Ray task on a cluster node.

Each attempt asks Ray for `num_gpus=k`, so Ray does the GPU accounting across
nodes; the node-side task (`cluster.node`) streams 'started', 'exited' and the
outcome back, and this side fills the record draft from them. Cancelling passes
through: `ray.cancel` interrupts the task, which removes its container before it
ends, and the driver waits for that end, bounded. A node or worker that dies
mid-run surfaces as `ClusterNodeLostError`, which is transient, so the
dispatcher's retry policy runs the experiment again elsewhere.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import anyio
import anyio.to_thread
import structlog
from pydantic import BaseModel, ValidationError

from llem_dispatch import _labels
from llem_dispatch.cluster.connection import RayConnection, node_resource
from llem_dispatch.cluster.hosts import (
    NodeCheck,
    NodeSweep,
    preflight_hosts,
    sweep_hosts,
    unready_error,
)
from llem_dispatch.cluster.node import RunnerFactory, remote_task
from llem_dispatch.cluster.settings import RaySettings
from llem_dispatch.dispatch import GpuAtStart, NodeInfo, Placement, PlacementRequest, RecordDraft
from llem_dispatch.dispatch.attempt import AttemptReport
from llem_dispatch.errors import (
    ClusterError,
    ClusterNodeLostError,
    GpuRequestError,
    LlemError,
    ResultError,
)
from llem_dispatch.gpu import SettleSpec
from llem_dispatch.gpu.attempt_telemetry import NodeTelemetry
from llem_dispatch.models import ExperimentFailure, ExperimentResult, HashedConfig
from llem_dispatch.runners import ForceKill, current_force_kill
from llem_dispatch.runners.kinds import AUTO
from llem_dispatch.runners.protocol import Outcome

__all__ = ["PlacementWatcher", "RayPlacement", "lost_error", "node_error"]

log = structlog.get_logger("llem_dispatch.cluster")


def node_error(payload: Mapping[str, Any], node: NodeInfo | None) -> LlemError:
    """A node's error (see `cluster.node.error_payload`) as the same class here.

    Its message names the node; a `ClusterError` also carries the node's label.
    """
    suffix = f" [on node {node.label}]" if node is not None else ""
    error = LlemError.from_payload(payload, suffix=suffix)
    if isinstance(error, ClusterError):
        error.node = node.label if node is not None else None
    return error


def lost_error(exc: BaseException, config_hash: str, node: NodeInfo | None) -> LlemError:
    """A Ray failure as ours: the node-side code failing, or the node/worker lost."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        return ClusterError(
            f"the node-side task failed: {str(exc).splitlines()[0]}",
            fix_suggestion="Check that the node has the same llem-dispatch version as the "
            "driver; the worker log on that node has the traceback.",
        )
    where = f" on node {node.label}" if node is not None else ""
    # Ray's first sentence says what happened; the rest is advice on its tools.
    said = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else ""
    return ClusterNodeLostError(
        f"the Ray task running {config_hash} was lost{where}: {type(exc).__name__}: {said}",
        node=node.label if node is not None else None,
    )


@dataclass(slots=True)
class _Pending:
    """A submitted attempt not yet started on a node."""

    stream: Any
    gpus: int
    unplaceable_since: float | None = None
    reason: str | None = None


class PlacementWatcher:
    """Fails attempts no alive node can hold any more, instead of waiting forever.

    Ray keeps an infeasible task pending (an autoscaler might add a node). When
    the nodes big enough have left, an attempt waits `timeout_s`, then is
    cancelled and ends as a `ClusterError`, so the study finishes and `--resume`
    runs it once the cluster has grown back. The watching is a daemon thread.
    """

    def __init__(self, connection: RayConnection, timeout_s: float) -> None:
        self.connection = connection
        self.timeout_s = timeout_s
        self._pending: dict[int, _Pending] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, ray: ModuleType) -> None:
        """Start watching (once)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._watch, args=(ray,), name="llem-placement", daemon=True
            )
            self._thread.start()

    def track(self, stream: Any, gpus: int) -> _Pending:
        """Watch a submitted attempt until `placed` is called for it."""
        pending = _Pending(stream, gpus)
        self._pending[id(pending)] = pending
        return pending

    def placed(self, pending: _Pending) -> None:
        """The attempt has started on a node, or ended: stop watching it."""
        self._pending.pop(id(pending), None)

    async def aclose(self) -> None:
        """Stop the thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            await anyio.to_thread.run_sync(self._thread.join, 10)
            self._thread = None

    def _watch(self, ray: ModuleType) -> None:
        every = max(0.2, min(5.0, self.timeout_s / 3))
        while not self._stop.wait(every):
            if not any(p.gpus for p in self._pending.values()):
                continue
            try:
                largest = max(self.connection.cluster_gpus(max_age_s=0).values(), default=0)
            except Exception as exc:  # noqa: BLE001 - a GCS hiccup: look again next time
                log.debug("placement_check_failed", error=repr(exc))
                continue
            self._check(ray, largest, time.monotonic())

    def _check(self, ray: ModuleType, largest: int, now: float) -> None:
        for pending in list(self._pending.values()):
            if pending.gpus <= largest or pending.reason is not None:
                pending.unplaceable_since = None
                continue
            if pending.unplaceable_since is None:
                pending.unplaceable_since = now
            elif now - pending.unplaceable_since >= self.timeout_s:
                pending.reason = (
                    f"no node of the Ray cluster can hold an experiment of {pending.gpus} "
                    f"GPU(s) any more (the largest alive node has {largest}); waited "
                    f"{self.timeout_s:g}s"
                )
                with contextlib.suppress(Exception):
                    ray.cancel(pending.stream)


async def _drained(stream: Any, timeout_s: float, force_kill: ForceKill) -> bool:
    """Wait for a cancelled task's stream to end: False on timeout or a forced stop."""
    finished = False
    with anyio.move_on_after(timeout_s):
        async with anyio.create_task_group() as tg:

            async def drain() -> None:
                nonlocal finished
                with contextlib.suppress(Exception):
                    async for ref in stream:
                        with contextlib.suppress(Exception):
                            await ref
                finished = True
                tg.cancel_scope.cancel()

            async def forced() -> None:
                await force_kill.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(drain)
            tg.start_soon(forced)
    return finished


def _ray_settings(settings: BaseModel | None) -> RaySettings:
    """The study's `ray:` block, as validated at load (the defaults when there is none)."""
    if settings is None:
        return RaySettings()
    if not isinstance(settings, RaySettings):
        raise TypeError(f"the Ray placement's settings are RaySettings, not {type(settings)}")
    return settings


def _note_started(draft: RecordDraft, message: Mapping[str, Any]) -> None:
    draft.gpu_ids = list(message["gpu_ids"])
    AttemptReport.from_wire(message.get("report")).fill(draft)
    draft.gpus_at_start = [GpuAtStart(**g) for g in message.get("gpus_at_start", [])]
    draft.gpu_uuids = [g.uuid for g in draft.gpus_at_start if g.uuid]


class RayPlacement(Placement):
    """Runs each attempt as a Ray task on a node of the cluster at `address`.

    `runner_factory(NodeContext) -> Runner` is shipped to the nodes and called
    there for every attempt; results are validated with `result_model` here. A
    task keeps its GPUs past its container's exit until `cooldown_s` has passed since
    the end of its work (its `done` mark, else the exit). See
    `RayDispatcher` for the other options. Chosen by a study as `placement: ray`
    (or `cluster: ADDRESS`), with its `ray:` block (`RaySettings`); before the
    study it checks every host that may get an experiment, and it sweeps every
    host for the study's orphaned containers before and after.
    """

    #: Each node decides `runner: auto` for itself and builds the runner there.
    on_this_host = False
    settings_model: ClassVar[type[BaseModel] | None] = RaySettings
    gpus_assigned_elsewhere: ClassVar[tuple[str, str]] = (
        "on a Ray cluster Ray assigns them",
        "Drop them; set each node's GPUs with `ray start --num-gpus N`.",
    )

    def __init__(
        self,
        runner_factory: RunnerFactory,
        *,
        address: str | None = None,
        cooldown_s: float = 0.0,
        result_model: type[BaseModel] = ExperimentResult,
        runner_type: str = "ray",
        num_cpus: float = 1.0,
        runtime_env: Mapping[str, Any] | None = None,
        cancel_timeout_s: float = 60.0,
        placement_timeout_s: float = 300.0,
        init_options: Mapping[str, Any] | None = None,
        settle: SettleSpec | None = None,
        telemetry: NodeTelemetry | None = None,
        force_kill: ForceKill | None = None,
    ) -> None:
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.runner_factory = runner_factory
        self.connection = RayConnection(address, init_options)
        self.cooldown_s = cooldown_s
        #: The thermal gate, applied by each task on its node's GPUs after the exit.
        self.settle = settle
        #: GPU telemetry each task samples on its node (its samples come back in its report).
        self.telemetry = telemetry
        self.result_model = result_model
        self.runner_type = runner_type
        self.num_cpus = num_cpus
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self.cancel_timeout_s = cancel_timeout_s
        self.watcher = PlacementWatcher(self.connection, placement_timeout_s)
        #: Set (a second Ctrl-C), tasks being cancelled are killed without their drain.
        self.force_kill = force_kill or current_force_kill()
        self._factory_ref: Any = None

    def connect(self) -> ModuleType:
        """Connect (once), ship the runner factory, start the placement watcher."""
        ray = self.connection.connect()
        if self._factory_ref is None:
            self._factory_ref = ray.put(self.runner_factory)
        self.watcher.start(ray)
        return ray

    async def aclose(self) -> None:
        """Stop the watcher; disconnect from Ray if this placement connected (idempotent)."""
        await self.watcher.aclose()
        self._factory_ref = None
        self.connection.close()

    @staticmethod
    def _cancel_timeout_s(stop_grace_s: float, settings: BaseModel | None) -> float:
        cancel_s = _ray_settings(settings).cancel_timeout_s
        return cancel_s if cancel_s is not None else stop_grace_s + 30

    @classmethod
    def stop_bound_s(cls, stop_grace_s: float, settings: BaseModel | None) -> float:
        """Each cancelled task drains (its node removes the container) within the cancel
        timeout, or is killed; the end-of-study sweep then removes what a killed task
        left on any node. Under load a drain can take far longer than the grace."""
        return cls._cancel_timeout_s(stop_grace_s, settings) + cls.STUDY_SWEEP_S

    @classmethod
    def for_study(cls, request: PlacementRequest, settings: BaseModel | None) -> RayPlacement:
        """The study's runner factory shipped to the cluster its `ray:` block names."""
        ray = _ray_settings(settings)
        return cls(
            request.runner_factory,
            address=ray.address,
            cooldown_s=request.cooldown_s,
            # The thermal gate runs in each task, on its node's own GPUs.
            settle=request.settle,
            telemetry=request.telemetry,
            runner_type=request.runner_kind,
            num_cpus=ray.num_cpus,
            runtime_env=ray.runtime_env,
            cancel_timeout_s=cls._cancel_timeout_s(request.stop_grace_s, settings),
            placement_timeout_s=ray.placement_timeout_s,
            init_options=ray.init_options,
            force_kill=request.force_kill,
        )

    async def prepare(self, request: PlacementRequest) -> None:
        """No node too small, and every host that may get an experiment ready to run it."""
        if request.host_gpus.chosen or request.pool is not None:
            log.warning(
                "study_gpus_ignored_on_cluster",
                message="`gpus:`/`virtual_gpus:` choose GPUs of one host; on a Ray cluster, "
                "Ray assigns each node's GPUs (set them with `ray start --num-gpus N`).",
            )
        if request.prestart:
            log.warning(
                "study_prestart_ignored_on_cluster",
                message="`prestart:` holds containers at a gate on this host's GPU pool; "
                "a Ray cluster's placements start each experiment when its GPUs are free.",
            )
        self.check_request(request.max_gpu_count)
        await self.require_ready(
            images=request.host_needs.images,
            paths=request.host_needs.paths,
            runner_kind=request.runner_kind,
            gpus=request.max_gpu_count,
        )

    async def sweep(self, request: PlacementRequest, *, study_over: bool) -> None:
        """Reap the study's orphaned containers on every host (see `sweep_study`)."""
        await self.sweep_study(request.results_dir, study_over=study_over)

    async def sweep_study(self, results: Path, *, study_over: bool, timeout_s: float = 60) -> None:
        """Reap a study's orphaned containers on every host, logging each (logs kept)."""
        for swept in await self.sweep_hosts(
            results_dir=results,
            logs_dir=results / "orphans",
            study_over=study_over,
            timeout_s=timeout_s,
        ):
            for item in swept.reaped:
                log.warning(
                    "cluster_orphan_reaped",
                    node=swept.node.label,
                    container_id=str(item["container_id"])[:12],
                    config_hash=item["config_hash"],
                    log_path=item["log_path"],
                )

    def describe(self) -> Mapping[str, Any]:
        """The cluster's address and its GPUs per node."""
        return {"cluster": self.connection.address, "cluster_gpus": self.connection.cluster_gpus()}

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
        return await preflight_hosts(
            self.connection,
            runner=runner,
            images=images,
            paths=paths,
            gpus=gpus,
            num_cpus=self.num_cpus,
            timeout_s=timeout_s,
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
        checks = await self.preflight(runner=runner_kind, images=images, paths=paths, gpus=gpus)
        error = unready_error(
            checks,
            runner_kind=runner_kind,
            folder=paths[0] if paths else "",
            has_image=bool(images),
        )
        if error is not None:
            raise error

    async def sweep_hosts(
        self,
        *,
        results_dir: str | Path | None = None,
        logs_dir: str | Path | None = None,
        study_over: bool = False,
        dry_run: bool = False,
        timeout_s: float = 120.0,
    ) -> list[NodeSweep]:
        """Reap orphaned containers on every host of the cluster (see `sweep_cluster`)."""
        return await sweep_hosts(
            self.connection,
            results_dir=results_dir,
            logs_dir=logs_dir,
            study_over=study_over,
            dry_run=dry_run,
            timeout_s=timeout_s,
        )

    def check_request(self, gpus: int) -> None:
        """One experiment runs on one node: no node big enough is an immediate error."""
        if gpus == 0:
            return
        per_node = self.connection.cluster_gpus()
        largest = max(per_node.values(), default=0)
        if gpus > largest:
            raise GpuRequestError(
                f"an experiment asks for {gpus} GPU(s) but the largest node of the Ray cluster "
                f"has {largest} ({len(per_node)} node(s), {sum(per_node.values())} GPUs in "
                "all); one experiment never spans nodes",
                fix_suggestion=f"Ask for at most {largest} GPU(s) per experiment, or add a "
                "node with more (`ray start --num-gpus N`).",
            )

    def parallelism(self) -> int:
        """The cluster's GPU and CPU slots, and at least 8."""
        nodes = self.connection.nodes()
        slots = sum(int(node_resource(n, "GPU") + node_resource(n, "CPU")) for n in nodes)
        return max(8, slots)

    async def attempt(
        self,
        config: HashedConfig,
        gpus: int,
        draft: RecordDraft,
        on_started: Callable[[], None],
    ) -> Outcome:
        """Run one attempt as a Ray task asking for `gpus` GPUs; follow it to its outcome."""
        ray = self.connect()
        from ray.exceptions import RayError

        stream = self._submit(config, gpus)
        pending = self.watcher.track(stream, gpus)
        try:
            async for ref in stream:
                message = await ref
                self.watcher.placed(pending)
                outcome = self._on_message(message, draft, on_started)
                if outcome is not None:
                    # The task lives on through the cooldown, holding its GPUs.
                    return outcome
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._cancel(ray, stream, draft)
            raise
        except RayError as exc:
            if pending.reason is None:
                raise lost_error(exc, draft.config_hash, draft.node) from exc
            raise ClusterError(
                pending.reason,
                fix_suggestion=f"Add a node with at least {gpus} GPU(s) (`ray start --address "
                "HEAD:6379 --num-gpus N`), then run the study again with --resume.",
            ) from exc
        finally:
            self.watcher.placed(pending)
        raise ClusterError("the node-side task ended without an outcome")

    def _submit(self, config: HashedConfig, gpus: int) -> Any:
        """Start the node-side task; returns its stream of messages."""
        options: dict[str, Any] = {"num_gpus": gpus, "num_cpus": self.num_cpus}
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        return (
            remote_task("experiment")
            .options(**options)
            .remote(
                self._factory_ref,
                dict(config),
                config.config_hash,
                self.cooldown_s,
                _labels.HOSTNAME,
                self.settle,
                self.telemetry,
            )
        )

    def _on_message(
        self, message: Mapping[str, Any], draft: RecordDraft, on_started: Callable[[], None]
    ) -> Outcome | None:
        """Fill the draft from one message of the node; the outcome once it comes."""
        node = NodeInfo.model_validate(message["node"])
        draft.node = node
        kind = message["kind"]
        if kind == "started":
            _note_started(draft, message)
            on_started()
        elif kind == "exited":
            AttemptReport.from_wire(message.get("report")).fill(draft)
        elif kind == "error":
            raise node_error(message["error"], node)
        elif kind == "outcome":
            return self._outcome(message, node, draft.config_hash)
        return None

    def _outcome(self, message: Mapping[str, Any], node: NodeInfo, config_hash: str) -> Outcome:
        try:
            if "failure" in message:
                return ExperimentFailure.model_validate(message["failure"])
            return self.result_model.model_validate(message["result"])
        except ValidationError as exc:
            raise ResultError(
                f"the result from node {node.label} does not match "
                f"{self.result_model.__name__}: {exc}",
                config_hash=config_hash,
            ) from exc

    async def _cancel(self, ray: ModuleType, stream: Any, draft: RecordDraft) -> None:
        """Cancel the task and wait (bounded) until its node has cleaned up."""
        ray.cancel(stream)
        if await _drained(stream, self.cancel_timeout_s, self.force_kill):
            return
        ray.cancel(stream, force=True)
        log.warning(
            "cluster_task_killed",
            config_hash=draft.config_hash,
            node=draft.node.label if draft.node is not None else None,
            reason="forced" if self.force_kill.is_set() else "cleanup took too long",
            fix="its container is removed by the end-of-study sweep or "
            "`llem-dispatch reap --ray ADDRESS`",
        )
