"""Schedule, the pool's pure core: decisions on plain values, no event loop, no clock.

Every test drives time by hand (`now`) and hands readings in as values, so each
runs in microseconds and its figures are exact.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from llem_dispatch.gpu import SettleSpec
from llem_dispatch.gpu.schedule import BusyMemory, Grant, Reading, Request, Schedule
from llem_dispatch.gpu.thermal import SettleTracker

ALL4 = ("0", "1", "2", "3")
IDLE = (35.0, 70.0)
HOT = (70.0, 400.0)


def ask(schedule: Schedule, k: int, now: float = 0.0, **options: bool) -> Request:
    """Queue a request and run the step its waiter would run first."""
    request = Request(k, **options)
    schedule.enqueue(request)
    schedule.dispatch(now)
    return request


def held(request: Request) -> Grant:
    assert request.grant is not None, "not served"
    return request.grant


def asleep(schedule: Schedule, request: Request, now: float) -> None:
    """What a waiter does before it sleeps: note its deadline (the head keeps the time)."""
    request.deadline = schedule.next_deadline(now) if schedule.is_head(request) else math.inf


# -- grants and order -----------------------------------------------------------


def test_requests_get_distinct_ids_lowest_first_then_longest_free() -> None:
    schedule = Schedule(ALL4)
    a, b = ask(schedule, 1), ask(schedule, 1)
    assert (held(a).ids, held(b).ids) == (("0",), ("1",))
    schedule.release(held(a), 1.0)
    schedule.release(held(b), 2.0)
    # Never-used ids first; the grant lists its ids in pool order.
    assert held(ask(schedule, 3, 3.0)).ids == ("0", "2", "3")
    assert held(ask(schedule, 1, 3.0)).ids == ("1",)
    assert schedule.free_ids(3.0) == ()
    assert set(schedule.held) == set(ALL4)


def test_a_served_request_is_woken_and_a_step_wakes_nobody_else() -> None:
    schedule = Schedule(["0"])
    first = ask(schedule, 1)
    second = Request(1)
    schedule.enqueue(second)
    asleep(schedule, second, 0.0)
    assert second.deadline == math.inf  # nothing will free "0" but a release
    step = schedule.release(held(first), 1.0)
    assert step.woken == [second]
    assert held(second).ids == ("0",)


def test_cooldown_holds_an_id_and_the_head_keeps_the_time() -> None:
    schedule = Schedule(["0", "1"], cooldown_s=2.0)
    schedule.release(held(ask(schedule, 2)), 10.0)
    waiter = Request(1)
    schedule.enqueue(waiter)
    assert schedule.dispatch(11.0).woken == []
    asleep(schedule, waiter, 11.0)
    assert waiter.deadline == 12.0  # the cooldown end: nobody releases then
    assert schedule.free_ids(11.9) == ()
    step = schedule.dispatch(12.0)
    assert step.woken == [waiter]
    assert held(waiter).ids == ("0",)
    assert schedule.last_released["0"] == 10.0


def test_a_release_that_starts_an_earlier_cooldown_wakes_the_sleeping_head() -> None:
    schedule = Schedule(["0", "1"], cooldown_s=5.0)
    first, second = ask(schedule, 1), ask(schedule, 1)
    schedule.release(held(first), 0.0)
    head = Request(2)
    schedule.enqueue(head)
    schedule.dispatch(1.0)
    asleep(schedule, head, 1.0)
    assert head.deadline == 5.0
    # "1" is freed at 2 and cools until 7: later than 5, nobody needs waking.
    assert schedule.release(held(second), 2.0).woken == []
    assert schedule.dispatch(5.0).woken == []  # "0" alone is not enough
    asleep(schedule, head, 5.0)
    assert head.deadline == 7.0
    assert schedule.dispatch(7.0).woken == [head]


def test_revoke_gives_ids_back_without_a_cooldown() -> None:
    schedule = Schedule(["0"], cooldown_s=60.0)
    grant = held(ask(schedule, 1))
    schedule.revoke(grant, 5.0)
    assert grant.released
    assert schedule.free_ids(5.0) == ("0",)
    assert "0" not in schedule.last_released
    assert schedule.live == []


def test_withdrawn_head_hands_the_timer_to_the_next() -> None:
    schedule = Schedule(["0"], cooldown_s=1.0)
    schedule.release(held(ask(schedule, 1)), 0.0)
    head, behind = Request(1), Request(1)
    schedule.enqueue(head)
    schedule.enqueue(behind)
    asleep(schedule, head, 0.5)
    asleep(schedule, behind, 0.5)
    step = schedule.withdraw(head, 0.6)
    assert step.woken == [behind]  # asleep with no deadline: it must take over
    assert list(schedule.queue) == [behind]


# -- fairness -------------------------------------------------------------------


def _stream_then_big(max_backfill: int | None, rounds: int = 50) -> tuple[int, bool]:
    """4 GPUs busy with 1-GPU jobs; a 4-GPU request arrives, then 1-GPU ones keep coming."""
    schedule = Schedule(ALL4, max_backfill=max_backfill)
    running = [held(ask(schedule, 1)) for _ in range(4)]
    big = Request(4)
    schedule.enqueue(big)
    jumps = 0
    for t in range(1, rounds):
        small = Request(1)
        schedule.enqueue(small)
        schedule.release(running.pop(0), float(t))
        if big.grant is not None:
            return jumps, True
        if small.grant is not None:
            jumps += 1
            running.append(small.grant)
    return jumps, False


def test_multi_gpu_request_is_served_after_at_most_max_backfill_jumps() -> None:
    jumps, served = _stream_then_big(max_backfill=None)  # the pool size, 4
    assert served
    assert jumps <= 4


def test_unbounded_backfill_starves_the_multi_gpu_request() -> None:
    jumps, served = _stream_then_big(max_backfill=10**9)
    assert not served
    assert jumps >= 40


def test_strict_fifo_when_backfill_is_off() -> None:
    jumps, served = _stream_then_big(max_backfill=0)
    assert served
    assert jumps == 0


def test_backfill_goes_past_a_blocked_head_up_to_the_bound() -> None:
    schedule = Schedule(ALL4, max_backfill=2)
    ask(schedule, 1)
    big = ask(schedule, 4)
    one, two, three = ask(schedule, 1), ask(schedule, 1), ask(schedule, 1)
    assert (held(one).ids, held(two).ids) == (("1",), ("2",))
    assert three.grant is None  # the last free id is kept for the head
    assert big.jumps == 2
    assert [r.k for r in schedule.queue] == [4, 1]


# -- promises (prestart) ----------------------------------------------------------


def test_early_request_is_promised_a_running_grant_of_its_size_once() -> None:
    schedule = Schedule(["0", "1", "2"])
    pair, single = held(ask(schedule, 2)), held(ask(schedule, 1))
    a = ask(schedule, 1, early=True)
    b = ask(schedule, 2, early=True)
    c = ask(schedule, 1, early=True)
    assert (held(a).ids, held(a).pending) == (single.ids, True)
    assert (held(b).ids, held(b).pending) == (pair.ids, True)
    assert c.grant is None  # one successor per grant
    assert single.successor is held(a)
    assert set(schedule.promised) == {"0", "1", "2"}


def test_a_promise_activates_only_when_released_and_cooled() -> None:
    schedule = Schedule(["0"], cooldown_s=2.0)
    first = held(ask(schedule, 1))
    promise = held(ask(schedule, 1, 0.5, early=True))
    assert schedule.promise_to_sense(promise, 1.0) == ()
    assert schedule.ready_deadline(promise, 1.0) == math.inf  # held: wait for the release
    step = schedule.release(first, 3.0)
    assert step.promises == [promise]
    assert schedule.ready_deadline(promise, 3.0) == 5.0
    schedule.activate(promise, 4.0)
    assert promise.pending
    schedule.activate(promise, 5.0)
    assert not promise.pending
    assert schedule.held["0"].since == 5.0
    assert schedule.promised == {}
    assert schedule.live == [promise]


def test_a_given_up_promise_frees_its_claim_without_a_cooldown() -> None:
    schedule = Schedule(["0"], cooldown_s=10.0)
    first = held(ask(schedule, 1))
    promise = held(ask(schedule, 1, early=True))
    step = schedule.release(promise, 1.0)
    assert promise.released
    assert not promise.pending
    assert step.promises == [promise]  # its own waiter must stop waiting
    assert first.successor is None
    assert schedule.promised == {}
    assert "0" not in schedule.last_released
    assert held(ask(schedule, 1, 2.0, early=True)).pending  # promised again


def test_with_depth_promises_chain_and_each_waits_for_the_one_before() -> None:
    schedule = Schedule(["0"], cooldown_s=1.0)
    schedule.depth = 2
    first = held(ask(schedule, 1))
    second = held(ask(schedule, 1, early=True))
    third = held(ask(schedule, 1, early=True))
    fourth = ask(schedule, 1, early=True)
    assert (second.pending, third.pending, fourth.grant) == (True, True, None)  # 2 deep
    assert first.successor is second
    assert second.successor is third
    assert schedule.promised == {"0": second}  # the first in line
    step = schedule.release(first, 1.0)
    assert step.promises == [second]
    # Third is not first in line: nothing to sense, no deadline; second is.
    assert schedule.promise_to_sense(third, 5.0) == ()
    assert schedule.ready_deadline(third, 1.0) == math.inf
    schedule.activate(third, 5.0)
    assert third.pending
    schedule.activate(second, 2.0)
    assert not second.pending
    assert schedule.promised == {"0": third}
    # The chain moves up: the fourth, waiting, is promised now, behind third.
    assert held(fourth).pending
    assert third.successor is held(fourth)
    schedule.release(second, 3.0)
    schedule.activate(third, 4.0)
    assert not third.pending


def test_a_depth_raised_while_runs_wait_fills_the_chain_in_one_step() -> None:
    """`auto` depth learns mid-sweep: the deeper chain is promised at the next step,
    all of it, not one promise per later release (the GPU would wait for each)."""
    schedule = Schedule(["0"])
    first = held(ask(schedule, 1))
    waiting = [ask(schedule, 1, early=True) for _ in range(5)]
    assert [r.grant is not None for r in waiting] == [True, False, False, False, False]
    schedule.depth = 4
    step = schedule.dispatch(1.0)
    assert [r.grant is not None for r in waiting] == [True, True, True, True, False]
    assert step.woken == waiting[1:4]
    chain, tail = [], first
    while tail.successor is not None:
        tail = tail.successor
        chain.append(tail)
    assert chain == [r.grant for r in waiting[:4]]


def test_a_promise_given_up_in_the_middle_closes_the_chain() -> None:
    schedule = Schedule(["0"])
    schedule.depth = 3
    first = held(ask(schedule, 1))
    second = held(ask(schedule, 1, early=True))
    third = held(ask(schedule, 1, early=True))
    step = schedule.release(second, 1.0)  # given up before it was ready
    assert third in step.promises
    assert first.successor is third
    assert schedule.promised == {"0": third}
    schedule.release(first, 2.0)
    schedule.activate(third, 2.0)
    assert not third.pending


# -- sensing: readings come in as values ------------------------------------------


def test_with_a_memory_check_nothing_goes_out_unread() -> None:
    schedule = Schedule(["0", "1"], residual_memory_mb=100)
    request = ask(schedule, 1)
    assert request.grant is None
    assert schedule.unread
    assert schedule.to_sense(0.0) == ("0", "1")
    step = schedule.dispatch(0.0, {"0": Reading(5000.0), "1": Reading(None)})
    assert held(request).ids == ("1",)  # unknown counts as clean
    assert step.busy == [BusyMemory("0", 5000.0, handed_out=False)]
    assert not schedule.unread


def test_a_busy_device_is_blocked_for_a_poll_and_reported_once_per_spell() -> None:
    schedule = Schedule(["0"], residual_memory_mb=100, memory_poll_s=1.0)
    request = ask(schedule, 1)
    busy = {"0": Reading(900.0)}
    assert schedule.dispatch(0.0, busy).busy == [BusyMemory("0", 900.0, handed_out=False)]
    assert schedule.to_sense(0.5) == ()  # blocked until the next poll
    asleep(schedule, request, 0.5)
    assert request.deadline == 1.0
    assert schedule.dispatch(1.0, busy).busy == []  # still the same busy spell
    assert request.grant is None
    step = schedule.dispatch(2.0, {"0": Reading(50.0)})
    assert step.woken == [request]
    # Clean again: a later busy spell is reported again.
    schedule.release(held(request), 3.0)
    ask(schedule, 1, 3.0)
    assert schedule.dispatch(3.0, busy).busy == [BusyMemory("0", 900.0, handed_out=False)]


def test_warn_hands_a_busy_device_out_and_reports_each_time() -> None:
    schedule = Schedule(["0"], residual_memory_mb=100, on_busy_memory="warn")
    for t in (0.0, 1.0):
        request = Request(1)
        schedule.enqueue(request)
        step = schedule.dispatch(t, {"0": Reading(900.0)})
        assert step.busy == [BusyMemory("0", 900.0, handed_out=True)]
        schedule.release(held(request), t + 0.5)


def test_a_release_with_readings_due_wakes_the_sleeping_head() -> None:
    schedule = Schedule(["0"], residual_memory_mb=100)
    first = Request(1)
    schedule.enqueue(first)
    schedule.dispatch(0.0, {"0": Reading(0.0)})
    waiter = Request(1)
    schedule.enqueue(waiter)
    asleep(schedule, waiter, 0.0)
    step = schedule.release(held(first), 1.0)
    assert step.woken == [waiter]  # "0" must be sensed before it goes out
    assert waiter.grant is None
    assert schedule.unread


def test_nothing_to_sense_without_a_request_that_could_be_met() -> None:
    schedule = Schedule(["0", "1"], residual_memory_mb=100)
    assert schedule.to_sense(0.0) == ()  # nobody waits
    schedule.enqueue(Request(1))
    schedule.dispatch(0.0, {"0": Reading(0.0), "1": Reading(0.0)})
    schedule.enqueue(Request(2))
    assert schedule.to_sense(0.0) == ()  # one id left, two wanted
    assert Schedule(["0"]).to_sense(0.0) == ()  # no checks: never senses


# -- the settle rule (thermal gate) -----------------------------------------------


def _gated(**spec: float) -> Schedule:
    settle = SettleSpec(**{"min_s": 5, "hold_s": 3, "max_s": 120, "sample_s": 1, **spec})
    return Schedule(["0"], settle=SettleTracker(settle))


def test_a_released_gpu_goes_on_once_calm_for_the_hold_after_min_s() -> None:
    schedule = _gated()
    first = Request(1)
    schedule.enqueue(first)
    schedule.dispatch(0.0, {"0": Reading(thermal=IDLE)})  # first use: the baseline
    assert held(first).settle["0"].settled
    assert held(first).settle["0"].waited_s is None
    schedule.release(held(first), 10.0)
    waiter = Request(1)
    schedule.enqueue(waiter)
    t = 10.0
    while waiter.grant is None:
        hot = t < 18.0  # cools 8 s after the release
        schedule.dispatch(t, {"0": Reading(thermal=HOT if hot else IDLE)})
        if waiter.grant is not None:
            break
        asleep(schedule, waiter, t)
        assert waiter.deadline == t + 1.0  # the next sample
        t = waiter.deadline
        assert t < 60.0
    report = held(waiter).settle["0"]
    assert t == 21.0  # calm from 18, for 3 s
    assert report.settled
    assert report.waited_s == 11.0
    assert (report.temperature_c, report.power_w) == IDLE


def test_a_gpu_that_never_settles_goes_on_at_max_s_and_says_so() -> None:
    schedule = _gated(max_s=30)
    first = Request(1)
    schedule.enqueue(first)
    schedule.dispatch(0.0, {"0": Reading(thermal=IDLE)})
    schedule.release(held(first), 0.0)
    waiter = Request(1)
    schedule.enqueue(waiter)
    schedule.dispatch(29.0, {"0": Reading(thermal=HOT)})
    assert waiter.grant is None
    schedule.dispatch(30.0, {"0": Reading(thermal=HOT)})
    assert not held(waiter).settle["0"].settled
    assert held(waiter).settle["0"].waited_s == 30.0


def test_settling_gpus_are_sampled_even_while_no_request_can_be_met() -> None:
    spec = SettleSpec(min_s=5, hold_s=3, max_s=120, sample_s=1)
    schedule = Schedule(["0", "1"], settle=SettleTracker(spec))
    a, b = Request(1), Request(1)
    schedule.enqueue(a)
    schedule.enqueue(b)
    schedule.dispatch(0.0, {"0": Reading(thermal=IDLE), "1": Reading(thermal=IDLE)})
    schedule.release(held(a), 1.0)
    schedule.enqueue(Request(2))
    # "1" is held, so nobody can be served; "0" still needs its calm streak sampled.
    assert schedule.to_sense(2.0) == ("0",)
    assert schedule.to_sense(121.0) == ()  # past max_s it goes on whatever it reads


# -- purity -----------------------------------------------------------------------


GPU_PACKAGE = Path(__file__).resolve().parents[3] / "src" / "llem_dispatch" / "gpu"


@pytest.mark.parametrize("module", ["schedule.py", "thermal.py"])
def test_the_core_imports_no_event_loop_and_no_device(module: str) -> None:
    tree = ast.parse((GPU_PACKAGE / module).read_text())
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not {m for m in imported if m.split(".")[0] in {"anyio", "trio", "asyncio", "time"}}
    assert "llem_dispatch.gpu.discovery" not in imported


def test_gpu_modules_touch_only_their_own_private_attributes() -> None:
    # The pool once set GpuLease's private fields: each object's `_name`s are
    # its own (`self._x`, `cls._x`); others are read through public fields.
    reach_ins = [
        f"{path.name}:{node.lineno}: {ast.unparse(node)}"
        for path in sorted(GPU_PACKAGE.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
    ]
    assert not reach_ins, "\n".join(reach_ins)


def test_a_cooldown_counts_from_when_the_work_ended_and_the_ids_free_at_release() -> None:
    schedule = Schedule(["0"], cooldown_s=2.0)
    first = ask(schedule, 1)
    waiter = Request(1)
    schedule.enqueue(waiter)
    # Its work ended at 9, its process exited at 10: cooled at 11, not 12.
    assert schedule.release(held(first), 10.0, work_ended=9.0).woken == []
    assert schedule.cooling_since["0"] == 9.0
    # Released (what hand-off gaps count from) at its exit, not at the work's end.
    assert schedule.last_released["0"] == 10.0
    assert schedule.free_ids(10.9) == ()
    assert schedule.dispatch(11.0).woken == [waiter]


def test_a_work_end_after_the_release_counts_as_the_release() -> None:
    schedule = Schedule(["0"], cooldown_s=1.0)
    schedule.release(held(ask(schedule, 1)), 5.0, work_ended=7.0)
    assert schedule.cooling_since["0"] == 5.0
    assert schedule.last_released["0"] == 5.0
