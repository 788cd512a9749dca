"""Adaptive repetition: whether a config needs another cycle, from its results so far.

Pure decisions on plain values (tested in microseconds); `run_study` runs the
cycles they ask for and records every decision in the journal.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from llem_dispatch.study.sections import CycleSpec
from llem_dispatch.study.stats import Describe, describe

__all__ = ["CycleHistory", "Decision", "Unresolved", "Verdict", "decide", "result_field"]

#: more: run another cycle; converged: the CI is inside the target; unresolved: stop outside it.
Verdict = Literal["more", "converged", "unresolved"]


@dataclass(frozen=True, slots=True)
class Decision:
    """What `decide` says about one config, and on what figures."""

    verdict: Verdict
    stats: Describe
    reason: str


def result_field(record: Mapping[str, Any], field: str) -> float | None:
    """A record's numeric result field (dotted for nested), or None if absent or not a number."""
    result = record.get("result")
    data: Any = result.get("data", result) if isinstance(result, Mapping) else None
    for part in field.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return None
        data = data[part]
    if isinstance(data, bool) or not isinstance(data, int | float):
        return None
    return float(data)


def decide(values: list[float], cycles_run: int, spec: CycleSpec) -> Decision:
    """Whether a config that has run `cycles_run` cycles, giving `values`, needs another.

    Converged once its 95% CI half-width is within `rel_ci95` of |mean|; unresolved at
    `max` outside it, or when fewer than two cycles gave the field (a config that
    keeps failing, or does not report it, is not repeated in the hope it will).
    """
    stats = describe(values)
    target = spec.until.rel_ci95
    if cycles_run < spec.min:
        return Decision("more", stats, f"{cycles_run} of min {spec.min} cycles")
    if stats.within(target):
        return Decision("converged", stats, f"ci95 within {target:.3g} of the mean")
    if stats.n < 2:
        return Decision(
            "unresolved",
            stats,
            f"{stats.n} of {cycles_run} cycles gave a number for {spec.until.field!r}",
        )
    if cycles_run >= spec.max:
        return Decision("unresolved", stats, f"ci95 still {_rel(stats)} of the mean at max")
    return Decision("more", stats, f"ci95 {_rel(stats)} of the mean > {target:.3g}")


def _rel(stats: Describe) -> str:
    rel = stats.rel_ci95
    return "unknown" if rel is None else f"{rel:.3g}"


class Unresolved(BaseModel):
    """A config whose result field's CI stayed outside the target (in summary.json)."""

    config_hash: str
    config: dict[str, Any]
    field: str
    cycles: int
    n: int
    mean: float | None = None
    ci95: float | None = None
    rel_ci95: float | None = Field(default=None, description="ci95 / |mean|.")
    reason: str

    @classmethod
    def of(
        cls, config_hash: str, config: dict[str, Any], cycles: int, field: str, decision: Decision
    ) -> Unresolved:
        """The entry for a config `decide` left unresolved after `cycles` cycles."""
        stats = decision.stats
        return cls(
            config_hash=config_hash,
            config=config,
            field=field,
            cycles=cycles,
            n=stats.n,
            mean=stats.mean,
            ci95=stats.ci95,
            rel_ci95=stats.rel_ci95,
            reason=decision.reason,
        )


class CycleHistory:
    """Per config: the field's value of each cycle run (None where it failed or was absent)."""

    def __init__(self, field: str) -> None:
        self.field = field
        self._values: dict[str, dict[int, float | None]] = {}

    def add(self, record: Mapping[str, Any]) -> None:
        """One record (a record file's payload: config_hash, cycle, status, result)."""
        config_hash, cycle = record.get("config_hash"), record.get("cycle")
        if not isinstance(config_hash, str) or not isinstance(cycle, int):
            return
        ok = record.get("status") == "succeeded"
        value = result_field(record, self.field) if ok else None
        self._values.setdefault(config_hash, {})[cycle] = value

    def forget(self, config_hash: str, cycle: int) -> None:
        """Drop one cycle's value (it is to run again)."""
        self._values.get(config_hash, {}).pop(cycle, None)

    def cycles(self, config_hash: str) -> set[int]:
        """The config's cycles on record (succeeded or not)."""
        return set(self._values.get(config_hash, {}))

    def before(self, config_hash: str, cycle: int) -> tuple[list[float], int]:
        """(values, cycles run) of the config's cycles numbered below `cycle`."""
        seen = {c: v for c, v in self._values.get(config_hash, {}).items() if c < cycle}
        return [v for v in seen.values() if v is not None], len(seen)

    def decide(self, config_hash: str, cycle: int, spec: CycleSpec) -> Decision:
        """`decide` on the cycles below `cycle`: whether cycle `cycle` should run."""
        values, _ = self.before(config_hash, cycle)
        # Cycles 1..cycle-1 were all dispatched (a failed one counts as run).
        return decide(values, cycle - 1, spec)
