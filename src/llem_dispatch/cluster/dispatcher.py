"""Several hosts: dispatch experiments onto a Ray cluster (the optional `ray` extra).

`RayDispatcher` has the local `Dispatcher`'s surface (`run`, `map`, events,
`RunRecord`) and its policy (retries, concurrency cap); only where an attempt
runs differs. Each attempt is one Ray task asking for `num_gpus=k`, so Ray does
the GPU accounting across nodes. On the node where it lands, the task:

1. builds the configured runner there from a picklable factory (DockerRunner
   against that node's own daemon, or LocalRunner), handing it the GPU ids Ray
   assigned, which are that node's own device ids;
2. runs the experiment in a private event loop and streams 'started', 'exited'
   and the outcome back as they happen (a streaming-generator task);
3. keeps its GPUs for the cooldown after the container exits, so Ray cannot
   give them to the next experiment early (the driver has the result by then).

Cancelling passes through: `ray.cancel` interrupts the task, which cancels its
runner (SIGTERM, grace, SIGKILL, remove) before the task ends, and the driver
waits for that end, bounded. A node or worker that dies mid-run surfaces as
`ClusterNodeLostError`, which is transient, so the retry policy runs the
experiment again elsewhere. Results travel back only as JSON and are recorded
by the driver, so nothing is recorded twice. Containers left by a dead worker
are swept per node by `sweep_cluster`.
"""

from __future__ import annotations

import contextlib
import math
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.from_thread
import structlog
from pydantic import BaseModel, ValidationError

from llem_dispatch import _labels
from llem_dispatch import errors as _errors
from llem_dispatch._docker import docker_available, missing_images
from llem_dispatch.dispatch import (
    Dispatcher,
    Event,
    ExperimentStarted,
    NodeInfo,
    RetryPolicy,
)
from llem_dispatch.errors import (
    ClusterError,
    ClusterNodeLostError,
    DockerError,
    GpuRequestError,
    LlemError,
    ResultError,
)
from llem_dispatch.models import ExperimentFailure, ExperimentResult, HashedConfig
from llem_dispatch.runners import force_kill_requested, wait_until_forced
from llem_dispatch.runners.protocol import Outcome, RunInfo, Runner, RunObserver

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

log = structlog.get_logger("llem_dispatch.cluster")


@dataclass(frozen=True, slots=True)
class NodeContext:
    """What a runner factory knows about the node it is called on."""

    node: NodeInfo
    #: The GPU ids Ray assigned to this task: the node's own device ids.
    gpu_ids: tuple[str, ...]
    #: Their UUIDs where NVML answers on the node.
    gpu_uuids: Mapping[str, str]
    #: No NVIDIA GPU visible through NVML here: ids are Ray's logical ones, so run
    #: without device requests (as with `--virtual-gpus` on one host).
    virtual: bool
    #: The node is the driver's own host (paths of the driver are valid here).
    driver_host: bool


#: Called on the node, once per attempt, to build the runner there. It must pickle
#: (a module-level function, a `functools.partial`, a dataclass instance).
RunnerFactory = Callable[[NodeContext], Runner]


def _require_ray() -> ModuleType:
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(
            "running on a Ray cluster needs Ray, which is not installed",
            fix_suggestion="pip install 'llem-dispatch[ray]' on the driver and on every node.",
        ) from exc
    module: ModuleType = ray  # (typed Any where Ray is not installed)
    return module


# -- the node side -------------------------------------------------------------------


def _this_node() -> NodeInfo:
    import ray

    node_ip: Callable[[], str] = ray.util.get_node_ip_address
    return NodeInfo(
        hostname=socket.gethostname(),
        node_id=ray.get_runtime_context().get_node_id(),
        ip=node_ip(),
    )


def _node_gpus(ids: tuple[str, ...]) -> tuple[dict[str, str], bool]:
    """UUIDs of the assigned ids, and whether the node has no NVML-visible GPU."""
    from llem_dispatch.gpu.discovery import nvml_inventory

    inventory, _reason = nvml_inventory()
    if not inventory:
        # No NVML (pynvml missing?) but an NVIDIA driver: real GPUs, pass them through.
        return {}, not Path("/dev/nvidiactl").exists()
    by_id = dict(inventory)
    known = set(by_id.values())
    # Ray hands out the node's CUDA_VISIBLE_DEVICES entries: indices or UUIDs.
    return {i: by_id.get(i, i) for i in ids if i in by_id or i in known}, False


class _QueueObserver:
    """Passes a run's progress from the node's event loop to the task's thread."""

    def __init__(self, events: queue.Queue[dict[str, Any]], node: dict[str, Any]) -> None:
        self._events = events
        self._node = node
        self.exited_mono: float | None = None

    def on_started(self, info: RunInfo) -> None:
        self._events.put(
            {
                "kind": "started",
                "node": self._node,
                "gpu_ids": list(info.gpu_ids),
                "info": {
                    "runner_type": info.runner_type,
                    "started_at": info.started_at,
                    "container_id": info.container_id,
                    "process_id": info.process_id,
                    "exchange_dir": info.exchange_dir,
                    "log_path": info.log_path,
                    "image": info.image,
                    "image_digest": info.image_digest,
                },
            }
        )

    def on_exited(self, info: RunInfo) -> None:
        self.exited_mono = time.monotonic()
        self._events.put(
            {
                "kind": "exited",
                "node": self._node,
                "exited_at": info.exited_at,
                "exit_code": info.exit_code,
            }
        )


def _error_payload(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, LlemError):
        return {
            "type": type(exc).__name__,
            "message": exc.message,
            "fix_suggestion": exc.fix_suggestion,
            "config_hash": exc.config_hash,
            "exchange_dir": exc.exchange_dir,
            "stderr_snippet": getattr(exc, "stderr_snippet", None),
            "container_id": getattr(exc, "container_id", None),
            "exit_code": getattr(exc, "exit_code", None),
            "log_path": getattr(exc, "log_path", None),
        }
    return {"type": "ClusterError", "message": f"{type(exc).__name__}: {exc}"}


async def _run_on_node(
    factory: RunnerFactory,
    context: NodeContext,
    config: HashedConfig,
    events: queue.Queue[dict[str, Any]],
    observer: _QueueObserver,
) -> None:
    node = context.node.model_dump()
    runner: Runner | None = None
    try:
        runner = factory(context)
        outcome = await runner.run(config, gpus=context.gpu_ids, observer=observer)
    except Exception as exc:
        if not isinstance(exc, LlemError):
            log.exception("node_task_failed", config_hash=config.config_hash)
        events.put({"kind": "error", "node": node, "error": _error_payload(exc)})
    else:
        if isinstance(outcome, ExperimentFailure):
            payload = {"failure": outcome.model_dump(mode="json")}
        else:
            payload = {"result": outcome.model_dump(mode="json")}
        events.put({"kind": "outcome", "node": node, **payload})
    finally:
        if runner is not None:
            with anyio.move_on_after(30, shield=True):
                await runner.aclose()


def _experiment_task(
    factory: RunnerFactory,
    config: dict[str, Any],
    config_hash: str,
    cooldown_s: float,
    driver_host: str,
) -> Iterator[dict[str, Any]]:
    """The Ray task (a streaming generator): run one attempt on this node."""
    import ray

    node = _this_node()
    ids = tuple(str(i) for i in ray.get_gpu_ids())
    uuids, virtual = _node_gpus(ids)
    context = NodeContext(node, ids, uuids, virtual, node.hostname == driver_host)
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    observer = _QueueObserver(events, node.model_dump())
    # The run gets its own event loop in a thread; this (main) thread relays its
    # progress. `ray.cancel` raises KeyboardInterrupt here (between bytecodes, so
    # the waits below are short), and leaving the portal then cancels the run and
    # waits for its shielded cleanup: the container is gone before the task ends.
    with anyio.from_thread.start_blocking_portal() as portal:
        future = portal.start_task_soon(
            _run_on_node, factory, context, HashedConfig(config, config_hash), events, observer
        )
        while not (future.done() and events.empty()):
            try:
                item = events.get(timeout=0.1)
            except queue.Empty:
                continue
            yield item
        if (problem := future.exception()) is not None:
            yield {"kind": "error", "node": node.model_dump(), "error": _error_payload(problem)}
    # Hold the GPUs (this task's Ray resources) for the cooldown after the exit.
    if observer.exited_mono is not None and cooldown_s > 0:
        deadline = observer.exited_mono + cooldown_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))


def _sweep_task(
    results_dir: str | None,
    logs_dir: str | None,
    study_over: bool,
    dry_run: bool,
    driver_host: str,
) -> dict[str, Any]:
    """The Ray task run once per host by `sweep_cluster`."""
    from llem_dispatch.reap import reap

    node = _this_node()
    if not docker_available():
        return {"node": node.model_dump(), "reaped": [], "skipped": "no Docker daemon here"}
    if logs_dir is not None and node.hostname != driver_host:
        logs_dir = str(Path(tempfile.gettempdir()) / "llem-orphan-logs")
    try:
        found = anyio.run(
            lambda: reap(
                results_dir=results_dir, logs_dir=logs_dir, dry_run=dry_run, study_over=study_over
            )
        )
    except LlemError as exc:
        return {"node": node.model_dump(), "reaped": [], "skipped": exc.message}
    return {"node": node.model_dump(), "reaped": [asdict(r) for r in found], "skipped": None}


def _preflight_task(images: list[str], paths: list[str]) -> dict[str, Any]:
    """The Ray task run once per host by `RayDispatcher.preflight`."""
    docker = docker_available()
    return {
        "node": _this_node().model_dump(),
        "docker": docker,
        "missing_images": anyio.run(missing_images, images) if docker and images else [],
        "missing_paths": [p for p in paths if not Path(p).exists()],
    }


def _resource(node: Mapping[str, Any], name: str) -> float:
    """One resource of a node as `ray.nodes()` lists it (0 when it has none)."""
    return float(node.get("Resources", {}).get(name, 0))


def _label(node: Mapping[str, Any]) -> str:
    hostname = str(node.get("NodeManagerHostname", "?"))
    return NodeInfo(hostname=hostname, node_id=node["NodeID"]).label


_REMOTE: dict[str, Any] = {}


def _remote(name: str) -> Any:
    """The Ray remote functions, made on first use (Ray is imported lazily)."""
    if name not in _REMOTE:
        ray = _require_ray()
        # max_retries=0: the driver's retry policy decides, so each retry is
        # journalled and bounded like any other.
        _REMOTE["experiment"] = ray.remote(num_returns="streaming", max_retries=0)(_experiment_task)
        _REMOTE["sweep"] = ray.remote(num_cpus=0, max_retries=0)(_sweep_task)
        _REMOTE["preflight"] = ray.remote(num_cpus=0, max_retries=0)(_preflight_task)
    return _REMOTE[name]


# -- the driver side ------------------------------------------------------------------


def _rebuild_error(payload: Mapping[str, Any], node: NodeInfo | None) -> LlemError:
    """The node's error as the same class here, its message naming the node."""
    where = f" [on node {node.label}]" if node is not None else ""
    cls = getattr(_errors, str(payload.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, LlemError)):
        cls = ClusterError
    message = str(payload.get("message", "")) + where
    common: dict[str, Any] = {
        "fix_suggestion": payload.get("fix_suggestion"),
        "config_hash": payload.get("config_hash"),
        "exchange_dir": payload.get("exchange_dir"),
    }
    if issubclass(cls, DockerError):
        return cls(
            message,
            stderr_snippet=payload.get("stderr_snippet"),
            container_id=payload.get("container_id"),
            exit_code=payload.get("exit_code"),
            log_path=payload.get("log_path"),
            **common,
        )
    if issubclass(cls, ClusterError):
        return cls(message, node=node.label if node else None, **common)
    return cls(message, **common)


_CLUSTER_FIX = (
    "Start the cluster (`ray start --head` on the head node, `ray start --address "
    "HEAD:6379` on each other node), then pass the head's address to --ray / `cluster:`; "
    "`ray status` shows what is up."
)


def _probe_address(address: str | None, timeout_s: float = 5.0) -> None:
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
            fix_suggestion=_CLUSTER_FIX,
        ) from exc


class _NodeRunners:
    """Stands in for the runner: on a cluster, runners are built on the nodes."""

    def __init__(self, runner_type: str) -> None:
        self.runner_type = runner_type

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Any = None,
        observer: RunObserver | None = None,
    ) -> Outcome:
        raise ClusterError("a RayDispatcher runs experiments on cluster nodes, not here")

    async def aclose(self) -> None:
        return None


@dataclass(slots=True)
class _Pending:
    """A submitted attempt not yet started on a node."""

    stream: Any
    gpus: int
    unplaceable_since: float | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class NodeCheck:
    """What `RayDispatcher.preflight` found on one host."""

    node: NodeInfo
    docker: bool
    missing_images: list[str]
    missing_paths: list[str]


@dataclass(frozen=True, slots=True)
class NodeSweep:
    """What `sweep_cluster` did on one host."""

    node: NodeInfo
    reaped: list[dict[str, Any]]
    skipped: str | None


class RayDispatcher(Dispatcher):
    """A `Dispatcher` whose experiments run as Ray tasks across a cluster's nodes.

    `runner_factory(NodeContext) -> Runner` is shipped to the nodes and called
    there for every attempt. Results are validated with `result_model` on the
    driver. `address` is Ray's (`"auto"`, `"HOST:6379"`, `"ray://HOST:10001"`);
    an already initialised Ray is used as it is, and None starts a local one.
    """

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
    ) -> None:
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        super().__init__(
            _NodeRunners(runner_type),
            max_concurrency=max_concurrency,
            retries=retries,
            on_event=on_event,
        )
        self.runner_factory = runner_factory
        self.address = address
        self.cooldown_s = cooldown_s
        self.result_model = result_model
        self.num_cpus = num_cpus
        self.runtime_env = dict(runtime_env) if runtime_env else None
        self.cancel_timeout_s = cancel_timeout_s
        self.placement_timeout_s = placement_timeout_s
        self.init_options = dict(init_options or {})
        self._owns_ray = False
        self._factory_ref: Any = None
        self._pending: dict[int, _Pending] = {}
        self._nodes_cache: tuple[float, list[dict[str, Any]]] = (-math.inf, [])
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- connection -------------------------------------------------------------------

    def connect(self) -> ModuleType:
        """Connect to the cluster (once); raise `ClusterError` saying how to fix it."""
        ray = _require_ray()
        if not ray.is_initialized():
            options: dict[str, Any] = {"log_to_driver": False, "logging_level": "WARNING"}
            options.update(self.init_options)
            _probe_address(self.address)
            try:
                ray.init(address=self.address, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ClusterError(
                    f"cannot connect to the Ray cluster at {self.address!r}: {exc}",
                    fix_suggestion=_CLUSTER_FIX,
                ) from exc
            self._owns_ray = True
        if self._factory_ref is None:
            self._factory_ref = ray.put(self.runner_factory)
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch_placement, args=(ray,), name="llem-placement", daemon=True
            )
            self._watcher.start()
        return ray

    def _watch_placement(self, ray: ModuleType) -> None:
        """Fail attempts no alive node can hold any more, instead of waiting forever.

        Ray keeps an infeasible task pending (an autoscaler might add a node). When
        the nodes big enough have left, an attempt waits `placement_timeout_s`, then
        is cancelled and ends as a `ClusterError`, so the study finishes and
        `--resume` runs it once the cluster has grown back.
        """
        every = max(0.2, min(5.0, self.placement_timeout_s / 3))
        while not self._watch_stop.wait(every):
            if not any(p.gpus for p in self._pending.values()):
                continue
            try:
                largest = max(self.cluster_gpus(max_age_s=0).values(), default=0)
            except Exception as exc:  # noqa: BLE001 - a GCS hiccup: look again next time
                log.debug("placement_check_failed", error=repr(exc))
                continue
            now = time.monotonic()
            for pending in list(self._pending.values()):
                if pending.gpus <= largest or pending.reason is not None:
                    pending.unplaceable_since = None
                    continue
                if pending.unplaceable_since is None:
                    pending.unplaceable_since = now
                elif now - pending.unplaceable_since >= self.placement_timeout_s:
                    pending.reason = (
                        f"no node of the Ray cluster can hold an experiment of {pending.gpus} "
                        f"GPU(s) any more (the largest alive node has {largest}); waited "
                        f"{self.placement_timeout_s:g}s"
                    )
                    with contextlib.suppress(Exception):
                        ray.cancel(pending.stream)

    async def aclose(self) -> None:
        """Disconnect from Ray if this dispatcher connected (idempotent)."""
        self._watch_stop.set()
        if self._watcher is not None:
            await anyio.to_thread.run_sync(self._watcher.join, 10)
            self._watcher = None
        self._factory_ref = None
        if self._owns_ray:
            self._owns_ray = False
            _require_ray().shutdown()

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
        return {_label(n): int(_resource(n, "GPU")) for n in self.nodes(max_age_s=max_age_s)}

    # -- policy -----------------------------------------------------------------------

    def check_request(self, gpus: int) -> None:
        """One experiment runs on one node: no node big enough is an immediate error."""
        if gpus < 0:
            raise GpuRequestError(f"gpus must be >= 0, got {gpus}")
        if gpus == 0:
            return
        per_node = self.cluster_gpus()
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
        if self.max_concurrency:
            return self.max_concurrency
        slots = sum(int(_resource(n, "GPU") + _resource(n, "CPU")) for n in self.nodes())
        return max(8, slots)

    # -- one attempt ------------------------------------------------------------------

    async def _attempt(self, data: dict[str, Any], gpus: int, record: dict[str, Any]) -> Outcome:
        ray = self.connect()
        from ray.exceptions import RayError

        options: dict[str, Any] = {"num_gpus": gpus, "num_cpus": self.num_cpus}
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        stream = (
            _remote("experiment")
            .options(**options)
            .remote(
                self._factory_ref,
                dict(data),
                record["config_hash"],
                self.cooldown_s,
                _labels.HOSTNAME,
            )
        )
        pending = _Pending(stream, gpus)
        self._pending[id(pending)] = pending
        try:
            async for ref in stream:
                message = await ref
                self._pending.pop(id(pending), None)
                outcome = self._on_message(message, record)
                if outcome is not None:
                    # The task lives on through the cooldown, holding its GPUs.
                    return outcome
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._cancel(ray, stream, record)
            raise
        except RayError as exc:
            if pending.reason is None:
                raise self._lost(exc, record) from exc
            raise ClusterError(
                pending.reason,
                fix_suggestion=f"Add a node with at least {gpus} GPU(s) (`ray start --address "
                "HEAD:6379 --num-gpus N`), then run the study again with --resume.",
            ) from exc
        finally:
            self._pending.pop(id(pending), None)
        raise ClusterError("the node-side task ended without an outcome")

    @staticmethod
    def _lost(exc: BaseException, record: dict[str, Any]) -> LlemError:
        """A Ray failure as ours: the node-side code failing, or the node/worker lost."""
        from ray.exceptions import RayTaskError

        if isinstance(exc, RayTaskError):
            return ClusterError(
                f"the node-side task failed: {str(exc).splitlines()[0]}",
                fix_suggestion="Check that the node has the same llem-dispatch version as the "
                "driver; the worker log on that node has the traceback.",
            )
        node = record.get("node")
        where = f" on node {node.label}" if isinstance(node, NodeInfo) else ""
        # Ray's first sentence says what happened; the rest is advice on its tools.
        said = str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else ""
        return ClusterNodeLostError(
            f"the Ray task running {record['config_hash']} was lost{where}: "
            f"{type(exc).__name__}: {said}",
            node=node.label if isinstance(node, NodeInfo) else None,
        )

    def _on_message(self, message: Mapping[str, Any], record: dict[str, Any]) -> Outcome | None:
        node = NodeInfo.model_validate(message["node"])
        record["node"] = node
        kind = message["kind"]
        if kind == "started":
            info = message["info"]
            record.update(gpu_ids=list(message["gpu_ids"]), **info)
            self.emit(
                ExperimentStarted(
                    record["config_hash"],
                    tuple(record["gpu_ids"]),
                    record["attempts"],
                    info.get("container_id"),
                    info.get("process_id"),
                    record["tags"],
                    node.label,
                )
            )
        elif kind == "exited":
            record["exited_at"] = message["exited_at"]
        elif kind == "error":
            raise _rebuild_error(message["error"], node)
        elif kind == "outcome":
            try:
                if "failure" in message:
                    return ExperimentFailure.model_validate(message["failure"])
                return self.result_model.model_validate(message["result"])
            except ValidationError as exc:
                raise ResultError(
                    f"the result from node {node.label} does not match "
                    f"{self.result_model.__name__}: {exc}",
                    config_hash=record["config_hash"],
                ) from exc
        return None

    async def _cancel(self, ray: ModuleType, stream: Any, record: dict[str, Any]) -> None:
        """Cancel the task and wait (bounded) until its node has cleaned up."""
        ray.cancel(stream)
        finished = False
        with anyio.move_on_after(self.cancel_timeout_s):
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
                    await wait_until_forced()
                    tg.cancel_scope.cancel()

                tg.start_soon(drain)
                tg.start_soon(forced)
        if not finished:
            ray.cancel(stream, force=True)
            node = record.get("node")
            log.warning(
                "cluster_task_killed",
                config_hash=record["config_hash"],
                node=node.label if isinstance(node, NodeInfo) else None,
                reason="forced" if force_kill_requested() else "cleanup took too long",
                fix="its container is removed by the end-of-study sweep or "
                "`llem-dispatch reap --ray ADDRESS`",
            )

    # -- checks -----------------------------------------------------------------------

    async def preflight(
        self,
        *,
        images: Sequence[str] = (),
        paths: Sequence[str] = (),
        gpus: int = 0,
        timeout_s: float = 60.0,
    ) -> list[NodeCheck]:
        """On each host that could run an experiment of `gpus` GPUs: Docker, images, paths."""
        nodes = [
            n
            for n in self.nodes()
            if _resource(n, "GPU") >= gpus and _resource(n, "CPU") >= self.num_cpus
        ]
        found = await _on_each_host(nodes, "preflight", (list(images), list(paths)), timeout_s)
        return [
            NodeCheck(
                NodeInfo.model_validate(f["node"]),
                f["docker"],
                f["missing_images"],
                f["missing_paths"],
            )
            for f in found
        ]

    async def require_ready(
        self,
        *,
        images: Sequence[str],
        paths: Sequence[str],
        runner_kind: str,
        gpus: int = 0,
    ) -> None:
        """Before anything runs: can every host that may get an experiment run it?

        `runner_kind` is docker, local or auto (docker where a daemon answers).
        Raises one `ClusterError` naming every problem on every node.
        """
        problems: list[str] = []
        folder = paths[0] if paths else ""
        for check in await self.preflight(images=images, paths=paths, gpus=gpus):
            where = f"node {check.node.label} ({check.node.ip})"
            use_docker = runner_kind == "docker" or (runner_kind == "auto" and check.docker)
            if use_docker and not check.docker:
                problems.append(f"{where}: no Docker daemon answers there")
            elif use_docker:
                problems += [f"{where}: image {i} is not there" for i in check.missing_images]
            elif check.missing_paths:
                problems.append(f"{where}: the study folder {folder} does not exist there")
        if problems:
            raise ClusterError(
                f"{len(problems)} problem(s) on the cluster's nodes; nothing was run:\n  "
                + "\n  ".join(problems),
                fix_suggestion="Build or pull the image on each node named (or push it to a "
                "registry they reach), start Docker there, or copy the study folder to the "
                "same path; then run again.",
            )

    # -- sweeping ---------------------------------------------------------------------

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
        args = (
            str(Path(results_dir).resolve()) if results_dir is not None else None,
            str(logs_dir) if logs_dir is not None else None,
            study_over,
            dry_run,
            _labels.HOSTNAME,
        )
        return [
            NodeSweep(NodeInfo.model_validate(d["node"]), d["reaped"], d["skipped"])
            for d in await _on_each_host(self.nodes(), "sweep", args, timeout_s)
        ]


async def sweep_orphans(
    dispatcher: RayDispatcher, results: Path, *, study_over: bool, timeout_s: float = 60
) -> None:
    """Reap a study's orphaned containers on every host, logging each (logs kept)."""
    for sweep in await dispatcher.sweep(
        results_dir=results,
        logs_dir=results / "orphans",
        study_over=study_over,
        timeout_s=timeout_s,
    ):
        for item in sweep.reaped:
            log.warning(
                "cluster_orphan_reaped",
                node=sweep.node.label,
                container_id=str(item["container_id"])[:12],
                config_hash=item["config_hash"],
                log_path=item["log_path"],
            )


async def _on_each_host(
    nodes: list[dict[str, Any]], task: str, args: tuple[Any, ...], timeout_s: float
) -> list[dict[str, Any]]:
    """Run one of our small tasks once per host (pinned to one of its nodes); gather."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Nodes sharing a host share its Docker daemon: one task each host is enough.
    by_host: dict[str, str] = {}
    for node in nodes:
        by_host.setdefault(str(node.get("NodeManagerHostname", node["NodeID"])), node["NodeID"])
    refs = [
        _remote(task)
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
    dispatcher = RayDispatcher(_NoRunnerFactory(), address=address)
    try:
        return await dispatcher.sweep(
            results_dir=results_dir,
            logs_dir=logs_dir,
            study_over=study_over,
            dry_run=dry_run,
            timeout_s=timeout_s,
        )
    finally:
        await dispatcher.aclose()


async def check_cluster(
    address: str | None,
    *,
    images: Sequence[str] = (),
    paths: Sequence[str] = (),
    timeout_s: float = 60.0,
) -> tuple[dict[str, int], list[NodeCheck]]:
    """GPUs per node, and on every host: a Docker daemon, `images` and `paths` present."""
    dispatcher = RayDispatcher(_NoRunnerFactory(), address=address)
    try:
        gpus = dispatcher.cluster_gpus()
        return gpus, await dispatcher.preflight(images=images, paths=paths, timeout_s=timeout_s)
    finally:
        await dispatcher.aclose()


class _NoRunnerFactory:
    def __call__(self, node: NodeContext) -> Runner:
        raise ClusterError("this dispatcher only sweeps; it runs no experiments")
