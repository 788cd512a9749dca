"""The attempts' files beside `squeue`, on trio's MockClock: a written outcome is taken
at the next look (a stat), a job that dies without one at the next poll, as before."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from trio.testing import MockClock

from llem_dispatch import SlurmPlacement, SlurmSettings
from llem_dispatch.dispatch import RecordDraft
from llem_dispatch.errors import ExperimentOOMError
from llem_dispatch.models import ExperimentResult
from llem_dispatch.runners.protocol import utcnow
from llem_dispatch.slurm import commands
from llem_dispatch.slurm.attempts import Attempt
from llem_dispatch.slurm.commands import JobState
from llem_dispatch.slurm.watch import JobWatch

T = TypeVar("T")


def on_mock_clock(main: Callable[[MockClock], Awaitable[T]]) -> T:
    """Run `main` on a clock that jumps to the next deadline whenever all tasks wait."""
    clock = MockClock(autojump_threshold=0)

    async def run() -> T:
        return await main(clock)

    result: T = anyio.run(run, backend="trio", backend_options={"clock": clock})
    return result


class FakeSlurm:
    """Each job RUNNING until its end time, then its end state; counts the queries."""

    def __init__(self, clock: MockClock, ends: dict[str, tuple[float, str]]) -> None:
        self.clock = clock
        self.ends = ends
        self.times: list[float] = []

    async def query(self, ids: Iterable[str]) -> dict[str, JobState]:
        now = self.clock.current_time()
        self.times.append(now)
        found = {}
        for i in ids:
            at, state = self.ends.get(i, (float("inf"), "COMPLETED"))
            found[i] = JobState(i, "RUNNING" if now < at else state, "node1")
        return found


class FakeFiles:
    """Files that appear at given clock times; counts the stats (from a worker thread)."""

    def __init__(self, clock: MockClock, appear: dict[Path, float]) -> None:
        self.clock = clock
        self.appear = appear
        self.stats = 0

    def exists(self, path: Path) -> bool:
        self.stats += 1
        return self.clock.current_time() >= self.appear.get(path, float("inf"))


OUTCOME = Path("/shared/a/outcome.json")


def test_a_written_outcome_is_taken_at_the_next_look_not_the_next_poll() -> None:
    async def main(clock: MockClock) -> tuple[object, float, JobWatch, FakeSlurm, int]:
        slurm = FakeSlurm(clock, {})
        files = FakeFiles(clock, {OUTCOME: 2.55})
        watch = JobWatch(1.0, 10.0, slurm.query, look_interval_s=0.1, exists=files.exists)
        asked = 0

        def done(state: JobState) -> bool:
            nonlocal asked
            asked += 1
            return not state.active

        found = await watch.wait_or_file("1", done, (OUTCOME,))
        return found, clock.current_time(), watch, slurm, asked

    found, at, watch, slurm, asked = on_mock_clock(main)
    assert found == OUTCOME
    # Seen at the first look after it appeared (2.6), not at a poll: polls came at
    # 0, 1 and 2.5 (backing off), the next would have been at 4.75.
    assert round(at, 6) == 2.6
    assert slurm.times == [0.0, 1.0, 2.5]
    assert watch.polls == 3
    # One stat per look (every 0.1 s), and the waiter was woken only by the polls.
    assert watch.stats == 26
    assert asked == 3


def test_a_job_that_dies_without_writing_is_found_by_squeue_as_before() -> None:
    async def main(clock: MockClock) -> tuple[object, JobWatch, FakeSlurm, FakeFiles]:
        slurm = FakeSlurm(clock, {"1": (4.0, "OUT_OF_MEMORY")})
        files = FakeFiles(clock, {})
        watch = JobWatch(1.0, 10.0, slurm.query, look_interval_s=0.1, exists=files.exists)
        found = await watch.wait_or_file("1", lambda s: not s.active, (OUTCOME,))
        return found, watch, slurm, files

    found, watch, slurm, files = on_mock_clock(main)
    assert isinstance(found, JobState)
    assert found.state == "OUT_OF_MEMORY"
    # The poll interval and its back-off are untouched by the looks in between.
    assert slurm.times == [0.0, 1.0, 2.5, 4.75]
    assert 46 <= files.stats <= 48
    assert files.stats == watch.stats


def test_one_look_stats_every_waited_file_once_however_many_wait() -> None:
    async def main(clock: MockClock) -> tuple[JobWatch, FakeSlurm, int, list[float]]:
        slurm = FakeSlurm(clock, {})
        outcomes = {Path(f"/shared/{i}/outcome.json"): 0.05 + i for i in range(10)}
        files = FakeFiles(clock, outcomes)
        watch = JobWatch(1.0, 10.0, slurm.query, look_interval_s=0.1, exists=files.exists)
        woken = 0
        taken: list[float] = []

        def done(state: JobState) -> bool:
            nonlocal woken
            woken += 1
            return False

        async def follow(job: str, outcome: Path) -> None:
            started = outcome.with_name("started.json")  # never written: stat'ed each look
            await watch.wait_or_file(job, done, (started, outcome))
            taken.append(clock.current_time())

        async with anyio.create_task_group() as tg:
            for i, outcome in enumerate(outcomes):
                tg.start_soon(follow, str(i), outcome)
        return watch, slurm, woken, taken

    watch, slurm, woken, taken = on_mock_clock(main)
    assert [round(t, 6) for t in taken] == [0.1 + i for i in range(10)]
    # Each look stats each waiting attempt's two files once: 2 * (1 + 11 + ... + 91).
    assert watch.stats == 2 * sum(1 + 10 * i for i in range(10))
    # Looks that find nothing wake nobody: waiters are woken by polls and new files.
    assert woken <= 10 * (len(slurm.times) + 10)


def test_hurry_polls_at_once_even_while_the_leader_sleeps_out_a_long_gap() -> None:
    async def main(clock: MockClock) -> list[float]:
        slurm = FakeSlurm(clock, {})
        watch = JobWatch(1.0, 10.0, slurm.query)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.wait, "1", lambda s: False)
            await anyio.sleep(30.5)
            watch.hurry()
            await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        return slurm.times

    times = on_mock_clock(main)
    assert times[-1] == 30.5
    assert times[-2] < 30.5 - 1.0  # backed off: the poll before was long before


# -- the placement: what an outcome file decides, and what Slurm must ------------------


def _placement(tmp_path: Path, watch: JobWatch) -> SlurmPlacement:
    """The placement with `watch` (a fake Slurm; a fake filesystem's clock)."""
    placement = SlurmPlacement(_no_factory, tmp_path, settings=SlurmSettings())
    placement.watch = watch
    return placement


def _no_factory(host: Any) -> Any:
    raise AssertionError("not called here")


def _attempt(tmp_path: Path) -> Attempt:
    attempt = Attempt.new(tmp_path, "abcd")
    attempt.job_id = "42"
    return attempt


def _written(attempt: Attempt, data: dict[str, Any], clock: MockClock, at: float) -> FakeFiles:
    """The outcome file, there from `at` on for the watch (its looks run in a worker
    thread, during which MockClock would jump to a writer task's deadline)."""
    path = attempt.folder / "outcome.json"
    path.write_text(json.dumps(data))
    return FakeFiles(clock, {path: at})


RESULT = {"config_hash": "abcd", "data": {"x": 1}, "runner": {"runner_type": "local"}}


def test_a_result_ends_the_attempt_before_slurm_lists_the_job_ended(tmp_path: Path) -> None:
    attempt = _attempt(tmp_path)

    async def main(clock: MockClock) -> tuple[JobState, object, list[float], set[str]]:
        slurm = FakeSlurm(clock, {"42": (60.0, "COMPLETED")})
        outcome = {"kind": "result", "result": RESULT, "info": {}}
        files = _written(attempt, outcome, clock, 5.0)
        placement = _placement(tmp_path, JobWatch(1.0, 10.0, slurm.query, exists=files.exists))
        state = await placement._until_ended(attempt)
        exiting = set(placement._exiting)
        ended = placement._ended(attempt, state, RecordDraft("abcd", {}, utcnow()))
        return state, ended, slurm.times, exiting

    state, ended, times, exiting = on_mock_clock(main)
    # A result written is a job that exits 0: COMPLETED, with no poll to say so.
    assert state.state == "COMPLETED"
    assert isinstance(ended, ExperimentResult)
    assert times == [0.0, 1.0, 2.5, 4.75]
    # ... and the study waits for it to leave the queue before it ends.
    assert exiting == {"42"}
    (line,) = [json.loads(x) for x in (tmp_path / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert line == {"event": "ended", "job_id": "42", "state": "COMPLETED"}


def test_any_other_outcome_is_classified_by_slurms_state(tmp_path: Path) -> None:
    attempt = _attempt(tmp_path)

    async def main(clock: MockClock) -> tuple[JobState, list[float], set[str]]:
        # The experiment was OOM-killed; Slurm says so once the job has exited.
        slurm = FakeSlurm(clock, {"42": (5.3, "OUT_OF_MEMORY")})
        failure = {"config_hash": "abcd", "type": "ExitError", "message": "exit 137"}
        outcome = {"kind": "failure", "failure": failure, "info": {}}
        files = _written(attempt, outcome, clock, 5.0)
        placement = _placement(tmp_path, JobWatch(1.0, 10.0, slurm.query, exists=files.exists))
        state = await placement._until_ended(attempt)
        with pytest.raises(ExperimentOOMError):
            placement._ended(attempt, state, RecordDraft("abcd", {}, utcnow()))
        return state, slurm.times, set(placement._exiting)

    state, times, exiting = on_mock_clock(main)
    assert state.state == "OUT_OF_MEMORY"
    # The outcome asked for a poll at once (RUNNING still), then the usual back-off.
    after = [t for t in times if t >= 5.0]
    assert len(after) == 2
    assert after[0] < 5.2
    assert round(after[1] - after[0], 6) == 1.5
    assert exiting == set()


def test_the_study_waits_for_jobs_exiting_after_their_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls: list[list[str]] = []
    cancelled: list[list[str]] = []

    async def squeue_states(ids: Iterable[str]) -> dict[str, JobState]:
        asked = sorted(ids)
        polls.append(asked)
        return {i: JobState(i, "COMPLETING" if len(polls) < 3 else "COMPLETED") for i in asked}

    async def scancel(ids: Iterable[str], **kw: Any) -> None:
        cancelled.append(sorted(ids))

    monkeypatch.setattr(commands, "squeue_states", squeue_states)
    monkeypatch.setattr(commands, "scancel", scancel)

    async def main(clock: MockClock) -> float:
        placement = _placement(tmp_path, JobWatch())
        placement._exiting |= {"7", "8"}
        await placement.aclose()
        await placement.aclose()  # nothing left: no poll
        return clock.current_time()

    took = on_mock_clock(main)
    # At once, then 0.1 s and 0.2 s later: a few quick polls, not the poll interval's.
    assert polls == [["7", "8"]] * 3
    assert round(took, 6) == 0.3
    assert cancelled == []
