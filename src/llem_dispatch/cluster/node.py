"""What runs on a cluster node: the runner factory's context and the Ray task bodies.

An experiment's task builds the runner on its node, runs the attempt in a private
event loop (the runner portal) and streams 'started', 'exited' and the outcome
back as plain messages (with telemetry, 'exited' comes again before the outcome,
its report carrying the samples of the task's GPUs taken on the node); the
per-host sweep and preflight tasks are here too, with the Ray remote functions
made from them on first use (Ray is imported lazily).
"""

from __future__ import annotations

import functools
import queue
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.from_thread
import structlog

from llem_dispatch.dispatch import NodeInfo
from llem_dispatch.dispatch.attempt import AttemptReport
from llem_dispatch.errors import ClusterError, LlemError, error_payload
from llem_dispatch.gpu.attempt_telemetry import AttemptSampling, NodeTelemetry
from llem_dispatch.gpu.discovery import nvml_inventory
from llem_dispatch.gpu.held import gpus_at_start, settle_after_exit
from llem_dispatch.gpu.thermal import SettleSpec
from llem_dispatch.models import ExperimentFailure, HashedConfig
from llem_dispatch.runners.kinds import AUTO, kinds_for
from llem_dispatch.runners.protocol import RunInfo, Runner

__all__ = [
    "NodeContext",
    "RunnerFactory",
    "error_payload",
    "experiment_task",
    "preflight_task",
    "remote_task",
    "require_ray",
    "sweep_task",
    "this_node",
]

log = structlog.get_logger("llem_dispatch.cluster")

#: A message from a node-side task to the driver (plain data: it crosses Ray).
Message = dict[str, Any]


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


def require_ray() -> ModuleType:
    """The `ray` module, or a `ClusterError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ClusterError(
            "running on a Ray cluster needs Ray, which is not installed",
            fix_suggestion="pip install 'llem-dispatch[ray]' on the driver and on every node.",
        ) from exc
    module: ModuleType = ray  # (typed Any where Ray is not installed)
    return module


def this_node() -> NodeInfo:
    """The node this (Ray worker) process runs on."""
    ray = require_ray()
    node_ip: Callable[[], str] = ray.util.get_node_ip_address
    return NodeInfo(
        hostname=socket.gethostname(),
        node_id=ray.get_runtime_context().get_node_id(),
        ip=node_ip(),
    )


def _node_gpus(ids: tuple[str, ...]) -> tuple[dict[str, str], bool]:
    """UUIDs of the assigned ids, and whether the node has no NVML-visible GPU."""
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

    def __init__(
        self,
        events: queue.Queue[Message],
        node: dict[str, Any],
        at_start: list[dict[str, Any]] | None = None,
    ) -> None:
        self._events = events
        self._node = node
        self._at_start = at_start or []
        self.started_mono: float | None = None
        self.exited_mono: float | None = None
        #: Where the GPUs' cooldown counts from: the end of the work (its `done` mark)
        #: where known, else the exit.
        self.cooldown_from_mono: float | None = None
        #: The report at the exit (None before it).
        self.exited: AttemptReport | None = None

    def on_started(self, info: RunInfo) -> None:
        self.started_mono = time.monotonic()
        self._events.put(
            {
                "kind": "started",
                "node": self._node,
                "gpu_ids": list(info.gpu_ids),
                "gpus_at_start": self._at_start,
                "report": AttemptReport.of(info).to_wire(),
            }
        )

    def on_exited(self, info: RunInfo) -> None:
        self.exited_mono = now = time.monotonic()
        held_s = now - self.started_mono if self.started_mono is not None else 0.0
        self.cooldown_from_mono = now - info.work_ended_s_ago(held_s)
        self.exited = AttemptReport.of(info)
        # With its phases (prepare, gate, work marks), as a local run records them.
        self._events.put({"kind": "exited", "node": self._node, "report": self.exited.to_wire()})

    async def ship_telemetry(self, sampling: AttemptSampling | None) -> None:
        """Once the run has exited: the exit's report again, with its GPUs' samples."""
        if sampling is None or self.exited is None:
            return
        exited_at = self.exited.exited_at
        telemetry = await sampling.finish(exited_at.timestamp() if exited_at else None)
        report = self.exited.with_telemetry(telemetry)
        self._events.put({"kind": "exited", "node": self._node, "report": report.to_wire()})


async def _run_on_node(
    factory: RunnerFactory,
    context: NodeContext,
    config: HashedConfig,
    events: queue.Queue[Message],
    observer: _QueueObserver,
    telemetry: NodeTelemetry | None = None,
) -> None:
    """Build the runner here, run the attempt, queue its outcome (or error) as a message.

    With `telemetry`, the attempt's GPUs are sampled here from before the run until
    past its exit; the samples go back ahead of the outcome."""
    node = context.node.model_dump()
    runner: Runner | None = None
    sampling: AttemptSampling | None = None
    try:
        runner = factory(context)
        # Handed over by UUID where NVML knows it: never a guessable index.
        gpus = tuple(context.gpu_uuids.get(i, i) for i in context.gpu_ids)
        sampling = AttemptSampling.start(telemetry, gpus)
        outcome = await runner.run(config, gpus=gpus, observer=observer)
    except Exception as exc:
        if not isinstance(exc, LlemError):
            log.exception("node_task_failed", config_hash=config.config_hash)
        await observer.ship_telemetry(sampling)
        events.put({"kind": "error", "node": node, "error": error_payload(exc)})
    else:
        if isinstance(outcome, ExperimentFailure):
            payload = {"failure": outcome.model_dump(mode="json")}
        else:
            payload = {"result": outcome.model_dump(mode="json")}
        await observer.ship_telemetry(sampling)
        events.put({"kind": "outcome", "node": node, **payload})
    finally:
        if sampling is not None:
            sampling.stop()
        if runner is not None:
            with anyio.move_on_after(30, shield=True):
                await runner.aclose()


def _relay(
    factory: RunnerFactory,
    context: NodeContext,
    config: HashedConfig,
    observer: _QueueObserver,
    events: queue.Queue[Message],
    telemetry: NodeTelemetry | None = None,
) -> Iterator[Message]:
    """Run the attempt in its own event loop (the portal); yield its messages here."""
    # This (main) thread relays the run's progress. `ray.cancel` raises
    # KeyboardInterrupt here (between bytecodes, so the waits below are short), and
    # leaving the portal then cancels the run and waits for its shielded cleanup:
    # the container is gone before the task ends.
    with anyio.from_thread.start_blocking_portal() as portal:
        future = portal.start_task_soon(
            _run_on_node, factory, context, config, events, observer, telemetry
        )
        while not (future.done() and events.empty()):
            try:
                item = events.get(timeout=0.1)
            except queue.Empty:
                continue
            yield item
        if (problem := future.exception()) is not None:
            node = context.node.model_dump()
            yield {"kind": "error", "node": node, "error": error_payload(problem)}


def experiment_task(
    factory: RunnerFactory,
    config: dict[str, Any],
    config_hash: str,
    cooldown_s: float,
    driver_host: str,
    settle: SettleSpec | None = None,
    telemetry: NodeTelemetry | None = None,
) -> Iterator[Message]:
    """The Ray task (a streaming generator): run one attempt on this node (`telemetry`:
    what to sample of its GPUs here; None: nothing)."""
    ray = require_ray()
    node = this_node()
    ids = tuple(str(i) for i in ray.get_gpu_ids())
    uuids, virtual = _node_gpus(ids)
    context = NodeContext(node, ids, uuids, virtual, node.hostname == driver_host)
    events: queue.Queue[Message] = queue.Queue()
    at_start = [] if virtual else gpus_at_start(ids, uuids)
    observer = _QueueObserver(events, node.model_dump(), at_start)
    hashed = HashedConfig(config, config_hash)
    yield from _relay(factory, context, hashed, observer, events, telemetry)
    # Hold the GPUs (this task's Ray resources) past the exit until the cooldown from
    # the end of the work is over, then, with a thermal gate, until they have settled.
    if observer.cooldown_from_mono is not None and cooldown_s > 0:
        deadline = observer.cooldown_from_mono + cooldown_s
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
    if observer.exited_mono is not None and settle is not None and not virtual:
        settle_after_exit(ids, uuids, settle, observer.exited_mono)


def sweep_task(
    results_dir: str | None,
    logs_dir: str | None,
    study_over: bool,
    dry_run: bool,
    driver_host: str,
) -> dict[str, Any]:
    """The Ray task run once per host by the cluster sweep: `reap` there."""
    node = this_node()
    # Each container kind of the auto rule reaps its own leftovers, on its own engine.
    kinds = [k for k in kinds_for(AUTO) if k.reapable]
    if not any(k.available() for k in kinds):
        engines = " or ".join(k.engine for k in kinds) or "container engine"
        return {"node": node.model_dump(), "reaped": [], "skipped": f"no {engines} here"}
    if logs_dir is not None and node.hostname != driver_host:
        logs_dir = str(Path(tempfile.gettempdir()) / "llem-orphan-logs")
    logs = Path(logs_dir) if logs_dir is not None else None
    results = Path(results_dir) if results_dir is not None else None
    try:
        found = [
            reaped
            for kind in kinds
            if kind.available()
            for reaped in anyio.run(
                functools.partial(
                    kind.reap,
                    results_dir=results,
                    logs_dir=logs,
                    dry_run=dry_run,
                    study_over=study_over,
                )
            )
        ]
    except LlemError as exc:
        return {"node": node.model_dump(), "reaped": [], "skipped": exc.message}
    return {"node": node.model_dump(), "reaped": [asdict(r) for r in found], "skipped": None}


def preflight_task(runner: str, images: list[str], paths: list[str]) -> dict[str, Any]:
    """The Ray task run once per host by the preflight: engines, images, paths.

    `runner` is a kind's name or `auto`: each engine those kinds need is asked
    whether it answers here, and the first image kind that answers for `images`.
    """
    kinds = kinds_for(runner)
    engines = {k.name: k.available() for k in kinds if k.needs_engine}
    image_kind = next((k for k in kinds if k.needs_image and engines.get(k.name, True)), None)
    missing: list[str] = []
    if image_kind is not None and images:
        missing = anyio.run(image_kind.missing_images, images)
    return {
        "node": this_node().model_dump(),
        "engines": engines,
        "missing_images": missing,
        "missing_paths": [p for p in paths if not Path(p).exists()],
    }


_REMOTE: dict[str, Any] = {}


def remote_task(name: str) -> Any:
    """The Ray remote function of a task here ('experiment', 'sweep', 'preflight')."""
    if name not in _REMOTE:
        ray = require_ray()
        # max_retries=0: the driver's retry policy decides, so each retry is
        # journalled and bounded like any other.
        _REMOTE["experiment"] = ray.remote(num_returns="streaming", max_retries=0)(experiment_task)
        _REMOTE["sweep"] = ray.remote(num_cpus=0, max_retries=0)(sweep_task)
        _REMOTE["preflight"] = ray.remote(num_cpus=0, max_retries=0)(preflight_task)
    return _REMOTE[name]
