"""Adaptive repetition: the pure decision, the schema, and run_study with a FakeRunner.

Configs of known noise: a noiseless one stops at `min`, a noisy one runs to `max`
and is named unresolved, and the figures behind each decision match numpy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import anyio
import numpy
import pytest

from llem_dispatch.errors import ConfigError
from llem_dispatch.report import stats_rows
from llem_dispatch.study import Study, expand_study, iter_records, load_study, run_study
from llem_dispatch.study.adaptive import CycleHistory, decide
from llem_dispatch.study.chains import CycleChains
from llem_dispatch.study.plan import cycle_experiments, unique_configs
from llem_dispatch.study.sections import CycleSpec
from llem_dispatch.testing import FakeRunner

SPEC = CycleSpec.model_validate({"min": 3, "max": 6, "until": {"field": "e", "rel_ci95": 0.05}})

#: Values each config gives, cycle after cycle. "medium" is inside 5% after 5 cycles:
#: after 4, ci95 = t(3) * 3.266 / 2 = 5.20% of 100; after 5, t(4) * 2.828 / sqrt(5) = 3.51%.
SERIES = {
    "flat": [100.0] * 12,
    "medium": [100.0, 104.0, 96.0, 100.0, 100.0, 100.0, 100.0],
    "noisy": [100.0, 160.0, 40.0, 130.0, 70.0, 150.0, 50.0, 120.0],
}


def test_decide_stops_inside_the_target_and_at_max() -> None:
    assert decide([100.0] * 3, 3, SPEC).verdict == "converged"
    assert decide([100.0, 104.0, 96.0], 3, SPEC).verdict == "more"
    assert decide([100.0, 104.0, 96.0, 100.0], 4, SPEC).verdict == "more"
    assert decide([100.0, 104.0, 96.0, 100.0, 100.0], 5, SPEC).verdict == "converged"
    at_max = decide(SERIES["noisy"][:6], 6, SPEC)
    assert at_max.verdict == "unresolved"
    assert "at max" in at_max.reason
    assert decide([100.0, 100.0], 2, SPEC).verdict == "more", "below min: always more"


def test_decide_does_not_repeat_a_config_that_gives_no_numbers() -> None:
    failing = decide([5.0], 3, SPEC)
    assert failing.verdict == "unresolved"
    assert "1 of 3 cycles" in failing.reason


def test_history_decides_on_earlier_cycles_only() -> None:
    history = CycleHistory("nested.e")
    for cycle, value in enumerate([100.0, 104.0, 96.0, 100.0, 100.0], 1):
        history.add(
            {
                "config_hash": "h",
                "cycle": cycle,
                "status": "succeeded",
                "result": {"data": {"nested": {"e": value}}},
            }
        )
    history.add({"config_hash": "h", "cycle": 6, "status": "failed", "result": None})
    assert history.decide("h", 4, SPEC).verdict == "more"
    assert history.decide("h", 6, SPEC).verdict == "converged"
    assert history.before("h", 7) == ([100.0, 104.0, 96.0, 100.0, 100.0], 6)


@pytest.mark.parametrize(
    ("n_cycles", "message"),
    [
        ("{min: 1, max: 4, until: {field: e, rel_ci95: 0.05}}", "n_cycles.min: Input should be"),
        ("{min: 5, max: 4, until: {field: e, rel_ci95: 0.05}}", "max (4) is below min (5)"),
        ("{min: 3, max: 4, until: {field: e, rel_ci95: -1}}", "n_cycles.until.rel_ci95"),
        ("{min: 3, max: 4, until: {field: e}}", "n_cycles.until.rel_ci95: Field required"),
        ("{min: 3, max: 4, until: {feild: e, rel_ci95: 0.1}}", "n_cycles.until.feild"),
        ("0", "whole number of cycles >= 1"),
    ],
)
def test_adaptive_cycles_are_checked_at_load_with_their_line(
    tmp_path: Path, n_cycles: str, message: str
) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(f"name: s\ngrid: {{x: [1]}}\nn_cycles: {n_cycles}\n")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert f"{path}:3: n_cycles" in info.value.message
    assert message in info.value.message


def test_integer_cycles_stay_and_max_bounds_the_experiment_count() -> None:
    assert Study.model_validate({"grid": {"x": [1, 2]}, "n_cycles": 2}).max_cycles == 2
    study = Study.model_validate(
        {
            "grid": {"x": [1, 2]},
            "n_cycles": {"min": 2, "max": 9, "until": {"field": "e", "rel_ci95": 0.1}},
        }
    )
    assert (study.min_cycles, study.max_cycles, study.planned_experiments()) == (2, 9, 18)
    assert len(expand_study(study)) == 4, "the first `min` cycles"
    with pytest.raises(ValueError, match="18 experiments"):
        Study.model_validate({**study.model_dump(by_alias=True), "max_experiments": 10})


def test_later_cycles_follow_the_study_order_and_shuffle_reproducibly() -> None:
    base = {
        "grid": {"x": list(range(8))},
        "n_cycles": {"min": 2, "max": 5, "until": {"field": "e", "rel_ci95": 0.1}},
    }
    study = Study.model_validate({**base, "cycle_order": "interleaved"})
    items = unique_configs(study)
    assert [e.config["x"] for e in cycle_experiments(study, items, 3)] == list(range(8))
    shuffled = Study.model_validate({**base, "cycle_order": "shuffled", "seed": 3})
    first = [e.config["x"] for e in cycle_experiments(shuffled, items, 3)]
    assert first == [e.config["x"] for e in cycle_experiments(shuffled, items, 3)]
    assert sorted(first) == list(range(8))
    assert first != [e.config["x"] for e in cycle_experiments(shuffled, items, 4)]


def _study(**extra: Any) -> Study:
    return Study.model_validate(
        {
            "name": "adaptive",
            "grid": {"noise": list(SERIES)},
            "n_cycles": {"min": 3, "max": 6, "until": {"field": "e", "rel_ci95": 0.05}},
            "cycle_order": "interleaved",
            "max_concurrency": 1,
            **extra,
        }
    )


class Series:
    """A handler giving each config its next value of SERIES (counted on success only)."""

    def __init__(self, block_after: int | None = None) -> None:
        self.given: dict[str, int] = dict.fromkeys(SERIES, 0)
        self.block_after = block_after
        self.blocked = anyio.Event()

    async def __call__(self, config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        if self.block_after is not None and sum(self.given.values()) >= self.block_after:
            self.blocked.set()
            await anyio.sleep_forever()
        name = config["noise"]
        value = SERIES[name][self.given[name]]
        self.given[name] += 1
        return {"e": value, "tokens": 7}


async def test_noiseless_stops_at_min_noisy_runs_to_max_and_is_unresolved(tmp_path: Path) -> None:
    series = Series()
    out = tmp_path / "o"
    with anyio.fail_after(20):
        summary = await run_study(_study(), out, runner=FakeRunner(series))
    assert series.given == {"flat": 3, "medium": 5, "noisy": 6}
    assert summary.total == 14
    assert summary.succeeded == 14
    assert [u.config["noise"] for u in summary.unresolved] == ["noisy"]
    saved = json.loads((out / "summary.json").read_text())
    assert [u["config"]["noise"] for u in saved["unresolved"]] == ["noisy"]
    noisy = SERIES["noisy"][:6]
    unresolved = saved["unresolved"][0]
    assert unresolved["cycles"] == 6
    assert unresolved["mean"] == pytest.approx(_mean(noisy))
    # scipy.stats.t.ppf(0.975, 5) = 2.570581835636314
    ci = 2.570581835636314 * _std(noisy) / math.sqrt(6)
    assert unresolved["ci95"] == pytest.approx(ci, rel=1e-9)
    journal = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]
    # Each config decides alone, as its own cycles end: one line per decision.
    decided: dict[str, list[tuple[int, str]]] = {}
    names = {e["config_hash"]: e["config"]["noise"] for e in map(_record_of(out), journal) if e}
    for event in journal:
        if event["event"] == "cycle_decided":
            name = names[event["config_hash"]]
            decided.setdefault(name, []).append((event["cycles"], event["verdict"]))
    assert decided == {
        "flat": [(3, "converged")],
        "medium": [(3, "more"), (4, "more"), (5, "converged")],
        "noisy": [(3, "more"), (4, "more"), (5, "more"), (6, "unresolved")],
    }
    rows = {r["param.noise"]: r for r in stats_rows(list(iter_records(out)), ["noise"])}
    for name, count in series.given.items():
        values = SERIES[name][:count]
        assert rows[name]["n"] == count
        assert rows[name]["result.e_mean"] == pytest.approx(_mean(values))
        assert rows[name]["result.e_std"] == pytest.approx(_std(values), abs=1e-12)


def _record_of(out: Path) -> Any:
    """The record file a journal line names (None for other lines)."""

    def read(event: dict[str, Any]) -> dict[str, Any] | None:
        key = event.get("key")
        path = out / "records" / f"{key}.json"
        return json.loads(path.read_text()) if key and path.exists() else None

    return read


def _mean(values: list[float]) -> float:
    """numpy's mean (the `dev` extra declares numpy for these checks)."""
    return float(numpy.mean(values))


def _std(values: list[float]) -> float:
    """numpy's sample standard deviation (ddof=1)."""
    return float(numpy.std(values, ddof=1))


async def test_a_resumed_adaptive_study_continues_and_repeats_no_cycle(tmp_path: Path) -> None:
    out = tmp_path / "o"
    first = Series(block_after=10)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_study(_study(), out, runner=FakeRunner(first)))
            await first.blocked.wait()
            tg.cancel_scope.cancel()
    assert len(list((out / "records").glob("*.json"))) == 10, "cut in the adaptive cycles"
    second = Series()
    second.given = dict(first.given)  # the series goes on where the first run stopped
    with anyio.fail_after(20):
        summary = await run_study(_study(), out, runner=FakeRunner(second), resume=True)
    assert second.given == {"flat": 3, "medium": 5, "noisy": 6}, "the same cycles in all"
    ran_again = sum(second.given.values()) - sum(first.given.values())
    assert ran_again == 4, "only the cycles not yet on record"
    assert summary.skipped == 10
    assert summary.total == 14
    assert [u.config["noise"] for u in summary.unresolved] == ["noisy"]
    keys = sorted(p.stem for p in (out / "records").glob("*.json"))
    assert len(keys) == 14


async def test_no_config_waits_for_another_to_decide(tmp_path: Path) -> None:
    """`slow` holds its third cycle until `fast` has run its fifth: with a round that
    waits for all of its experiments, `fast` could never get past its fourth."""
    fast_fifth = anyio.Event()
    ran: dict[str, int] = {"fast": 0, "slow": 0}

    async def handler(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        name = config["noise"]
        ran[name] += 1
        if name == "slow" and ran[name] == 3:
            await fast_fifth.wait()
        if name == "fast" and ran[name] == 5:
            fast_fifth.set()
        # Never converges: alternating far apart.
        return {"e": 1.0 if ran[name] % 2 else 9.0, "tokens": 7}

    study = Study.model_validate(
        {
            "name": "no-barrier",
            "grid": {"noise": ["fast", "slow"]},
            "n_cycles": {"min": 2, "max": 6, "until": {"field": "e", "rel_ci95": 0.05}},
            "max_concurrency": 2,
        }
    )
    with anyio.fail_after(20):
        summary = await run_study(study, tmp_path / "o", runner=FakeRunner(handler))
    assert ran == {"fast": 6, "slow": 6}
    assert summary.succeeded == 12
    assert sorted(u.config["noise"] for u in summary.unresolved) == ["fast", "slow"]


def test_chains_speculate_one_cycle_ahead_never_past_max() -> None:
    spec = CycleSpec.model_validate({"min": 2, "max": 3, "until": {"field": "e", "rel_ci95": 0.01}})
    history = CycleHistory("e")
    chains = CycleChains.start(history, spec, [("h", {"x": 1})])
    assert chains.requested["h"] == {1, 2}
    # Cycle 1 done, 2 running: ask for 3 now (speculative), not 4 (past max).

    def record(cycle: int, value: float) -> None:
        history.add(
            {"config_hash": "h", "cycle": cycle, "status": "succeeded", "result": {"e": value}}
        )

    record(1, 1.0)
    # Its last min cycle runs: the next is asked for now, to be prepared beside it.
    step = chains.step("h", speculate=True)
    assert (step.request, step.speculative, step.decision) == ((3,), True, None)
    assert chains.step("h", speculate=True).request == ()  # one ahead at most
    record(2, 5.0)
    step = chains.step("h", speculate=True)
    assert (step.request, step.decision) == ((), None)  # 3 runs (4 would be past max)
    record(3, 9.0)
    final = chains.step("h", speculate=True)
    assert final.decision is not None
    assert final.decision.verdict == "unresolved"
    assert [u.cycles for u in chains.unresolved()] == [3]
    assert chains.step("h").decision is None  # decided on these cycles already
