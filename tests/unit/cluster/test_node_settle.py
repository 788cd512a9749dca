"""The thermal gate as a Ray task applies it on its node's GPUs (fake sensor, fake clock)."""

from __future__ import annotations

import queue
import time
from datetime import UTC, datetime

import pytest

from llem_dispatch.cluster import node
from llem_dispatch.gpu import SettleSpec, held
from llem_dispatch.gpu.held import gpus_at_start, settle_after_exit
from llem_dispatch.runners.protocol import PhaseTimes, RunInfo

IDLE = (35.0, 70.0)
HOT = (70.0, 400.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _fresh_baselines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(held, "_IDLE", {})


def test_task_start_reports_each_gpu_and_learns_its_idle_baseline() -> None:
    found = gpus_at_start(("0", "1"), {"0": "GPU-a", "1": "GPU-b"}, sensor=lambda d: IDLE)
    assert found == [
        {"id": "0", "uuid": "GPU-a", "temperature_c": 35.0, "power_w": 70.0},
        {"id": "1", "uuid": "GPU-b", "temperature_c": 35.0, "power_w": 70.0},
    ]
    assert held._IDLE == {"GPU-a": IDLE, "GPU-b": IDLE}


def test_the_task_holds_its_gpus_until_both_have_settled() -> None:
    clock = Clock()
    exited = clock.now
    cool_at = {"GPU-a": exited + 4, "GPU-b": exited + 9}
    held._IDLE.update({"GPU-a": IDLE, "GPU-b": IDLE})

    def sensor(device: str) -> tuple[float, float]:
        return IDLE if clock.now >= cool_at[device] else HOT

    spec = SettleSpec(min_s=2, hold_s=3, max_s=60, sample_s=0.5)
    settled = settle_after_exit(
        ("0", "1"), {"0": "GPU-a", "1": "GPU-b"}, spec, exited,
        sensor=sensor, clock=clock, sleep=clock.sleep,
    )  # fmt: skip
    assert settled
    assert clock.now - exited == pytest.approx(12.0, abs=0.6)  # the slower GPU, + hold


def test_a_gpu_that_never_settles_is_let_go_at_max_s() -> None:
    clock = Clock()
    exited = clock.now
    spec = SettleSpec(min_s=2, hold_s=3, max_s=20, sample_s=0.5, baselines={"0": IDLE})
    settled = settle_after_exit(
        ("0",), {}, spec, exited, sensor=lambda d: HOT, clock=clock, sleep=clock.sleep
    )
    assert not settled
    assert clock.now - exited == pytest.approx(20.0, abs=0.6)


def _info(work_ended: float | None) -> RunInfo:
    ended = datetime.fromtimestamp(work_ended, UTC) if work_ended is not None else None
    return RunInfo("h", ("0",), "/x", "/x/log", "local", phases=PhaseTimes(work_ended_at=ended))


def test_the_cooldown_counts_from_the_done_mark_within_the_time_held() -> None:
    assert _info(None).work_ended_s_ago(10.0, now=100.0) == 0.0  # no mark: from the exit
    assert _info(98.5).work_ended_s_ago(10.0, now=100.0) == pytest.approx(1.5)
    assert _info(50.0).work_ended_s_ago(3.0, now=100.0) == 3.0  # never before it got its GPUs
    assert _info(101.0).work_ended_s_ago(3.0, now=100.0) == 0.0  # a clock step: the exit


def test_a_ray_task_holds_its_gpus_for_the_cooldown_from_the_end_of_the_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    observer = node._QueueObserver(queue.Queue(), {"hostname": "n"})
    clock = Clock()
    monkeypatch.setattr(node.time, "monotonic", clock)
    observer.on_started(_info(None))
    clock.sleep(20.0)
    info = _info(time.time() - 1.25)  # its work ended 1.25 s before the exit
    observer.on_exited(info)
    assert observer.exited_mono == 120.0
    assert observer.cooldown_from_mono == pytest.approx(118.75, abs=0.05)
    observer.on_exited(_info(None))
    assert observer.cooldown_from_mono == observer.exited_mono  # no mark: from the exit
