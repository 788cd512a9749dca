"""A Ray task's node side samples its GPUs over the attempt and sends the samples back
ahead of the outcome (no Ray: the task's body with a FakeRunner)."""

from __future__ import annotations

import queue
from typing import Any

import anyio

from llem_dispatch.cluster import node
from llem_dispatch.dispatch import NodeInfo
from llem_dispatch.dispatch.attempt import AttemptReport
from llem_dispatch.gpu.attempt_telemetry import NodeTelemetry
from llem_dispatch.models import HashedConfig
from llem_dispatch.testing import FakeRunner


async def _messages(telemetry: NodeTelemetry | None) -> list[dict[str, Any]]:
    async def work(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        await anyio.sleep(0.3)
        return {"ok": True}

    info = NodeInfo(hostname="n1", node_id="abc123")
    context = node.NodeContext(info, ("0", "1"), {"0": "GPU-a"}, False, False)
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    observer = node._QueueObserver(events, info.model_dump())
    config = HashedConfig({"x": 1}, "hash")
    await node._run_on_node(
        lambda _: FakeRunner(work), context, config, events, observer, telemetry
    )
    return [events.get_nowait() for _ in range(events.qsize())]


async def test_the_samples_of_the_tasks_gpus_come_back_before_the_outcome() -> None:
    spec = NodeTelemetry(interval_s=0.02, reader="llem_dispatch.testing:constant_power_reader")
    messages = await _messages(spec)
    assert [m["kind"] for m in messages] == ["started", "exited", "exited", "outcome"]
    first, last = (AttemptReport.from_wire(m["report"]) for m in messages[1:3])
    assert first.telemetry is None, "the exit is told at once; the samples follow"
    assert last.telemetry is not None
    # Sampled as handed to the runner: by UUID where NVML knows it, else by its id.
    assert last.telemetry.gpus == ["GPU-a", "1"]
    exited = last.exited_at
    assert exited is not None
    for gpu in ("GPU-a", "1"):
        samples = last.telemetry.samples_of(gpu, exited.timestamp() - 0.3, exited.timestamp())
        assert samples
        assert {s.power_w for s in samples} == {100.0}


async def test_without_telemetry_the_messages_are_as_before() -> None:
    messages = await _messages(None)
    assert [m["kind"] for m in messages] == ["started", "exited", "outcome"]
    assert AttemptReport.from_wire(messages[1]["report"]).telemetry is None
