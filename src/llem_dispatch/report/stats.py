"""One row per config: n, and mean, std and 95% CI half-width of every numeric field.

What `results --stats` writes and `load_results(dir, stats=True)` returns; pure
Python over the flat rows (`flat_row`), so the two agree on every column.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from llem_dispatch.report.data import PARAM, RESULT, flat_row, sort_records, window_disturbed
from llem_dispatch.study.stats import describe

__all__ = ["STAT_SUFFIXES", "numeric_fields", "stats_rows"]

#: The columns each numeric field gets, in this order.
STAT_SUFFIXES = ("_mean", "_std", "_ci95")
#: Numeric per-experiment columns that are not result fields but vary by cycle.
_MEASURED = ("duration_s", "handoff_gap_s")
#: Record-level columns kept (the same across a config's cycles).
_CONFIG_COLUMNS = ("config_hash",)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def numeric_fields(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The measured columns (durations, `result.*`, `energy.*`) holding a number in some row."""
    names: dict[str, None] = {}
    for row in rows:
        for name, value in row.items():
            measured = name in _MEASURED or name.startswith((RESULT, "energy."))
            if measured and _number(value) is not None:
                names[name] = None
    return list(names)


def stats_rows(
    records: Iterable[Mapping[str, Any]], params: list[str], *, exclude_disturbed: bool = False
) -> list[dict[str, Any]]:
    """One row per config over its succeeded cycles, ordered by parameters.

    Columns: `config_hash`, `param.<name>`..., `n` (succeeded cycles counted), `runs`
    (records, failures included), `disturbed` (succeeded cycles whose measured window
    overlapped a neighbour's unpaused preparation; only where some record says), then
    for every numeric field F: `F_mean`, `F_std` (sample, ddof=1), `F_ci95` (half-width
    of the Student-t 95% interval of the mean), and `F_n` only where F is missing from
    some counted cycle. Std and CI are None below two values. With `exclude_disturbed`,
    the disturbed cycles are left out of `n` and of every figure.
    """
    records = list(records)
    known = any(window_disturbed(r) is not None for r in records)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    order: list[str] = []
    for record in sort_records(records, params):
        key = str(record.get("config_hash") or record.get("key"))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(record)
    flat = {key: [flat_row(r) for r in groups[key]] for key in order}
    ok = {key: [r for r in rows if r.get("status") == "succeeded"] for key, rows in flat.items()}
    disturbed = {key: sum(r["window_disturbed"] is True for r in rows) for key, rows in ok.items()}
    if exclude_disturbed:
        ok = {k: [r for r in rows if r["window_disturbed"] is not True] for k, rows in ok.items()}
    fields = numeric_fields(r for rows in ok.values() for r in rows)
    out: list[dict[str, Any]] = []
    for key in order:
        first = flat[key][0]
        row: dict[str, Any] = {c: first.get(c) for c in _CONFIG_COLUMNS}
        row.update({c: v for c, v in first.items() if c.startswith(PARAM)})
        succeeded = ok[key]
        row["n"] = len(succeeded)
        row["runs"] = len(flat[key])
        if known:
            row["disturbed"] = disturbed[key]
        for name in fields:
            values = [v for r in succeeded if (v := _number(r.get(name))) is not None]
            summary = describe(values)
            row[f"{name}_mean"] = summary.mean
            row[f"{name}_std"] = summary.std
            row[f"{name}_ci95"] = summary.ci95
            if summary.n != len(succeeded):
                row[f"{name}_n"] = summary.n
        out.append(row)
    return out
