"""Dispatcher policy with the in-process FakeRunner: records, retries, GPUs, events."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from llem_dispatch import (
    DockerContainerError,
    DockerOOMError,
    DockerTimeoutError,
    DockerUnavailableError,
    ExperimentFailure,
    ExperimentResult,
    GpuRequestError,
    RunInfo,
    RunObserver,
)
from llem_dispatch.dispatch import (
    Dispatcher,
    Event,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentQueued,
    ExperimentRetried,
    ExperimentStarted,
    NodeInfo,
    RecordDraft,
    RetryPolicy,
)
from llem_dispatch.gpu import GpuPool
from llem_dispatch.models import HashedConfig
from llem_dispatch.runners.protocol import Outcome, utcnow
from llem_dispatch.testing import FakeRunner

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay_s=0.001, max_delay_s=0.01)


async def test_success_record_has_gpus_and_result() -> None:
    async with Dispatcher(
        FakeRunner(lambda c, g: {"got": list(g)}), pool=GpuPool.virtual_devices(2)
    ) as d:
        record = await d.run({"m": 1}, gpus=2)
    assert record.ok
    assert record.attempts == 1
    assert sorted(record.gpu_ids) == ["0", "1"]
    assert record.result is not None
    assert sorted(record.result["data"]["got"]) == ["0", "1"]
    assert isinstance(record.outcome, ExperimentResult)
    assert record.started_at is not None
    assert record.ended_at is not None
    assert record.ended_at >= record.started_at


async def test_failure_and_error_records_never_raise() -> None:
    def handler(config: dict[str, Any], gpus: tuple[str, ...]) -> Any:
        if config["kind"] == "fail":
            return ExperimentFailure(type="ValueError", message="bad", config_hash="x")
        if config["kind"] == "error":
            raise DockerContainerError("exit 3", exit_code=3, stderr="boom")
        if config["kind"] == "bug":
            raise RuntimeError("unexpected")
        return {"ok": True}

    async with Dispatcher(FakeRunner(handler), retries=FAST_RETRY) as d:
        records = {
            c["kind"]: await d.run(c) for c in ({"kind": k} for k in ("ok", "fail", "error", "bug"))
        }
    assert records["ok"].status == "succeeded"
    assert records["fail"].status == "failed"
    assert records["fail"].failure is not None
    assert records["error"].status == "error"
    assert records["error"].error is not None
    assert records["error"].error.type == "DockerContainerError"
    assert records["error"].error.exit_code == 3
    assert records["error"].attempts == 1, "experiment failures are not retried"
    assert records["bug"].status == "error"
    assert records["bug"].error is not None
    assert records["bug"].error.type == "RuntimeError"


async def test_transient_errors_retry_with_backoff_then_succeed() -> None:
    calls = 0

    def handler(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise DockerUnavailableError("daemon down")
        return {"ok": True}

    events: list[Event] = []
    async with Dispatcher(FakeRunner(handler), retries=FAST_RETRY, on_event=events.append) as d:
        record = await d.run({"x": 1})
    assert record.ok
    assert record.attempts == 3
    retried = [e for e in events if isinstance(e, ExperimentRetried)]
    assert [e.attempt for e in retried] == [1, 2]
    assert all(e.error == "DockerUnavailableError" for e in retried)


@pytest.mark.parametrize("exc", [DockerTimeoutError("t"), DockerOOMError("o")])
async def test_timeouts_and_oom_are_not_retried_unless_asked(exc: Exception) -> None:
    def handler(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        raise exc

    async with Dispatcher(FakeRunner(handler), retries=FAST_RETRY) as d:
        record = await d.run({"x": 1})
    assert record.attempts == 1
    policy = RetryPolicy(max_attempts=2, base_delay_s=0.001, retry_timeouts=True, retry_oom=True)
    async with Dispatcher(FakeRunner(handler), retries=policy) as d:
        record = await d.run({"x": 1})
    assert record.attempts == 2


async def test_retries_give_up_at_max_attempts() -> None:
    def handler(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        raise DockerUnavailableError("still down")

    async with Dispatcher(FakeRunner(handler), retries=FAST_RETRY) as d:
        record = await d.run({"x": 1})
    assert record.status == "error"
    assert record.attempts == 4


def test_backoff_is_capped_exponential() -> None:
    policy = RetryPolicy(base_delay_s=1, max_delay_s=5, jitter=False)
    assert [policy.delay(a) for a in range(1, 6)] == [1, 2, 4, 5, 5]
    jittered = RetryPolicy(base_delay_s=1, max_delay_s=5)
    assert all(0 <= jittered.delay(4) <= 5 for _ in range(50))


async def test_too_many_gpus_fails_at_once() -> None:
    async with Dispatcher(FakeRunner(), pool=GpuPool.virtual_devices(4)) as d:
        with anyio.fail_after(1), pytest.raises(GpuRequestError):
            await d.run({"x": 1}, gpus=5)


async def test_map_yields_every_record_and_respects_concurrency() -> None:
    running = peak = 0

    async def handler(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.01)
        running -= 1
        return {"i": config["i"]}

    async with Dispatcher(FakeRunner(handler), max_concurrency=3) as d:
        seen = [r.config["i"] async for r in d.map([{"i": i} for i in range(20)])]
    assert sorted(seen) == list(range(20))
    assert peak == 3


async def test_gpu_never_shared_under_map() -> None:
    holders: dict[str, int] = {}
    overlaps = 0

    async def handler(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        nonlocal overlaps
        for g in gpus:
            overlaps += holders.get(g, 0)
            holders[g] = holders.get(g, 0) + 1
        await anyio.sleep(0.005)
        for g in gpus:
            holders[g] -= 1
        return {}

    async with Dispatcher(FakeRunner(handler), pool=GpuPool.virtual_devices(3)) as d:
        records = [r async for r in d.map([{"i": i} for i in range(30)], gpus=2)]
    assert len(records) == 30
    assert overlaps == 0
    assert all(len(r.gpu_ids) == 2 for r in records)


async def test_breaking_out_of_map_cancels_the_rest() -> None:
    started = 0

    async def handler(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        nonlocal started
        started += 1
        await anyio.sleep(0 if config["i"] == 0 else 30)
        return {}

    with anyio.fail_after(5):
        async with (
            Dispatcher(FakeRunner(handler), max_concurrency=4) as d,
            aclosing(d.map([{"i": i} for i in range(10)])) as records,
        ):
            async for record in records:
                assert record.config["i"] == 0
                break
    assert started <= 8


async def test_events_in_order_for_one_run() -> None:
    events: list[Event] = []
    async with Dispatcher(
        FakeRunner(), pool=GpuPool.virtual_devices(1), on_event=events.append
    ) as d:
        await d.run({"x": 1}, gpus=1, tags={"key": "k1"})
        await d.run({"x": 2}, gpus=1)
    kinds = [type(e) for e in events]
    assert kinds[:3] == [ExperimentQueued, ExperimentStarted, ExperimentFinished]
    started = events[1]
    assert isinstance(started, ExperimentStarted)
    assert started.gpu_ids == ("0",)
    assert started.tags == {"key": "k1"}
    failed_events = [e for e in events if isinstance(e, ExperimentFailed)]
    assert failed_events == []


class TeardownRunner:
    """Exits (observer.on_exited), then spends a while on teardown, like log collection."""

    runner_type = "teardown"

    def __init__(self, teardown_s: float) -> None:
        self.teardown_s = teardown_s
        self.starts: list[float] = []

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Sequence[str] | None = None,
        observer: RunObserver | None = None,
    ) -> Outcome:
        info = RunInfo(
            config_hash="h",
            gpu_ids=tuple(gpus or ()),
            exchange_dir="",
            log_path="",
            runner_type="teardown",
            started_at=utcnow(),
        )
        self.starts.append(anyio.current_time())
        assert observer is not None
        observer.on_started(info)
        await anyio.sleep(0.05)
        observer.on_exited(info)
        await anyio.sleep(self.teardown_s)
        return ExperimentFailure(type="x", message="y", config_hash="h")

    async def aclose(self) -> None:
        pass


async def test_gpu_handed_over_at_exit_not_after_teardown() -> None:
    runner = TeardownRunner(teardown_s=1.0)
    async with Dispatcher(runner, pool=GpuPool.virtual_devices(1)) as d:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(d.run, {"a": 1}, gpus=1))
                tg.start_soon(functools.partial(d.run, {"a": 2}, gpus=1))
    first, second = runner.starts
    # The second run started on the only GPU during the first one's 1 s teardown.
    assert second - first < 0.5


async def test_handoff_gap_is_recorded() -> None:
    async with Dispatcher(FakeRunner(), pool=GpuPool.virtual_devices(1)) as d:
        first = await d.run({"a": 1}, gpus=1)
        second = await d.run({"a": 2}, gpus=1)
    assert first.handoff_gap_s is None
    assert second.handoff_gap_s is not None
    assert 0 <= second.handoff_gap_s < 1


async def test_cancelling_the_caller_cancels_the_run() -> None:
    cancelled = anyio.Event()

    async def handler(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        try:
            await anyio.sleep(30)
        finally:
            cancelled.set()
        return {}

    pool = GpuPool.virtual_devices(1)
    async with Dispatcher(FakeRunner(handler), pool=pool) as d:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(d.run, {"a": 1}, gpus=1))
                await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
            await cancelled.wait()
    assert pool.free_ids() == ("0",)


async def test_closing_dispatcher_closes_runner() -> None:
    runner = FakeRunner()
    async with Dispatcher(runner):
        pass
    assert runner.closed


class Echo(BaseModel):
    hash: str


class ElsewherePlacement:
    """A placement of the test's own: the first attempt is lost, the second runs 'remotely'."""

    runner_type = "elsewhere"

    def __init__(self) -> None:
        self.attempts = 0
        self.closed = False

    def check_request(self, gpus: int) -> None:
        if gpus > 2:
            raise GpuRequestError("only 2 here")

    def parallelism(self) -> int:
        return 3

    async def attempt(
        self,
        config: HashedConfig,
        gpus: int,
        draft: RecordDraft,
        on_started: Callable[[], None],
    ) -> Outcome:
        self.attempts += 1
        draft.node = NodeInfo(hostname="far", node_id="ab" * 20)
        if self.attempts == 1:
            raise DockerUnavailableError("daemon gone")
        draft.gpu_ids = ["7"][:gpus]
        draft.started_at = utcnow()
        draft.container_id = "c1"
        on_started()
        return Echo(hash=config.config_hash)

    async def aclose(self) -> None:
        self.closed = True


async def test_a_placement_plugs_in_through_the_public_seam() -> None:
    placement = ElsewherePlacement()
    events: list[Event] = []
    async with Dispatcher(placement=placement, retries=FAST_RETRY, on_event=events.append) as d:
        assert d.parallelism() == 3
        with pytest.raises(GpuRequestError):
            await d.run({"a": 1}, gpus=3)
        record = await d.run({"a": 1}, gpus=1, tags={"key": "k"})
    assert placement.closed
    assert record.ok
    assert (record.attempts, record.runner_type, record.gpu_ids) == (2, "elsewhere", ["7"])
    assert record.node is not None
    assert record.result is not None
    assert record.result == {"hash": record.config_hash}
    started = [e for e in events if isinstance(e, ExperimentStarted)]
    assert len(started) == 1
    assert (started[0].gpu_ids, started[0].attempt) == (("7",), 2)
    assert (started[0].container_id, started[0].node) == ("c1", record.node.label)
    assert any(isinstance(e, ExperimentRetried) for e in events)


def test_a_dispatcher_takes_a_runner_or_a_placement() -> None:
    with pytest.raises(TypeError, match="runner"):
        Dispatcher()
    with pytest.raises(TypeError, match="not both"):
        Dispatcher(FakeRunner(), placement=ElsewherePlacement())
