"""The quiet-window ledger and core plan: pure logic, times given by the test."""

from __future__ import annotations

import anyio
import pytest

from llem_dispatch.dispatch.quiet import QuietHost, QuietLedger
from llem_dispatch.errors import ConfigError
from llem_dispatch.gpu.cores import plan_cores
from llem_dispatch.runners.protocol import CpuPlacement


def test_a_window_counts_unpaused_preparation_work_and_pauses_beside_it() -> None:
    ledger = QuietLedger()
    ledger.set_phase("a", "loading", 0.0)
    ledger.set_phase("b", "preparing", 0.0)
    ledger.set_phase("c", "preparing", 0.0)
    ledger.set_phase("a", "measuring", 1.0)  # b, c prepare beside it
    ledger.set_paused("b", True, 2.0)  # from 2 s on, b is frozen
    ledger.set_phase("d", "measuring", 3.0)  # another window from 3 s
    share = ledger.remove("a", 5.0)
    assert share is not None
    assert share.opened
    # 1-2: b and c (2 x 1 s); 2-5: c alone (3 s); d's loading before 3 is none of it.
    assert share.prepare_s == pytest.approx(5.0)
    assert share.work_s == pytest.approx(2.0)  # d measured 3-5
    assert share.paused_s == pytest.approx(3.0)  # b frozen 2-5
    assert share.disturbed


def test_waiting_at_a_gate_is_not_preparation_and_a_run_that_never_measured_has_no_share() -> None:
    ledger = QuietLedger()
    ledger.set_phase("a", "measuring", 0.0)
    ledger.set_phase("b", "waiting", 0.0)
    ledger.set_phase("c", "finishing", 0.0)
    assert ledger.to_pause() == []
    share = ledger.remove("a", 4.0)
    assert share is not None
    assert share.prepare_s == 0.0
    assert not share.disturbed
    assert ledger.remove("b", 4.0) is None


def test_pause_and_resume_follow_the_windows() -> None:
    ledger = QuietLedger()
    ledger.set_phase("b", "preparing", 0.0)
    assert ledger.to_pause() == []  # nothing measures
    assert ledger.to_pause(opening=True) == ["b"]
    ledger.set_paused("b", True, 0.0)
    ledger.set_phase("a", "measuring", 0.0)
    assert ledger.to_resume("pause") == []
    ledger.set_phase("a", "finishing", 1.0)
    assert ledger.to_resume("pause") == ["b"]
    # A paused run whose gate opens is thawed at once, windows open or not.
    ledger.set_phase("a", "measuring", 2.0)
    ledger.set_phase("b", "loading", 2.0)
    assert ledger.to_resume("pause") == ["b"]


class _Control:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    async def pause(self) -> bool:
        self.log.append(f"pause {self.name}")
        return True

    async def resume(self) -> None:
        self.log.append(f"resume {self.name}")

    async def place(self, placement: CpuPlacement) -> None:
        self.log.append(f"place {self.name}")


@pytest.mark.parametrize("policy", ["pause", "run"])
async def test_the_host_pauses_before_the_window_opens_and_resumes_after(policy: str) -> None:
    now = [0.0]
    host = QuietHost(policy, clock=lambda: now[0])  # type: ignore[arg-type]
    log: list[str] = []
    a, b = _Control(log, "a"), _Control(log, "b")
    with anyio.fail_after(5):
        await host.on_phase("b", "preparing", b)
        await host.on_phase("a", "loading", a)
        await host.on_phase("a", "measuring", a)
        log.append("window a")
        now[0] = 2.0
        await host.on_phase("a", "finishing", a)
        share = await host.finish("a")
        await host.finish("b")
    assert share is not None
    if policy == "pause":
        assert log == ["pause b", "window a", "resume b"]
        assert share.paused_s == pytest.approx(2.0)
        assert not share.disturbed
    else:
        assert log == ["window a"]
        assert share.prepare_s == pytest.approx(2.0)
        assert share.disturbed


def test_cores_split_by_nearness_with_a_spare_share_for_preparing() -> None:
    host = list(range(16))
    near = {"0": range(8), "1": range(8), "2": range(8, 16), "3": range(8, 16)}
    plan = plan_cores(host, ["0", "1", "2", "3"], affinity=near)
    # 8 cores shared by 2 GPUs, one share kept back: 2 each (8 // 3).
    assert plan.slots == {"0": (0, 1), "1": (2, 3), "2": (8, 9), "3": (10, 11)}
    assert plan.measuring(["1", "2"]) == (2, 3, 8, 9)
    assert plan.preparing() == (4, 5, 6, 7, 12, 13, 14, 15)
    assert plan.measuring([]) == ()


def test_cores_per_gpu_given_and_beyond_the_host() -> None:
    plan = plan_cores([0, 1, 2, 3], ["a", "b"], per_gpu=2)
    assert plan.slots == {"a": (0, 1), "b": (2, 3)}
    assert plan.preparing() == (0, 1, 2, 3)  # no spare: preparing runs share all, low priority
    with pytest.raises(ConfigError, match="cpus_per_gpu: 3 cores for each of 2 GPUs"):
        plan_cores([0, 1, 2, 3], ["a", "b"], per_gpu=3)
