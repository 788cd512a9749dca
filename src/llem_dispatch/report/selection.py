"""Which columns a person scans first, and which axes the plots use.

The study's `report:` section says; otherwise: the parameters that vary (the
constant ones go to a header line), the first few numeric result fields that are
measurements (not timestamps, not the `measure:` window's bounds), and the varying
numeric parameter with the most values on the x axis (never the cycle: a repetition
is averaged over, not plotted against).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llem_dispatch.report.data import PARAM, RESULT, StudyResults
from llem_dispatch.study import ReportSpec

__all__ = [
    "DEFAULT_RESULT_COLUMNS",
    "EPOCH_RANGE",
    "PlotAxes",
    "Selection",
    "is_timestamp",
    "plot_axes",
    "select_columns",
    "window_bounds",
]

#: How many result fields the table shows when the study does not choose.
DEFAULT_RESULT_COLUMNS = 3
#: Unix seconds from 2001-09 to 2096-10: a field whose every value lies here is a clock
#: reading (when something happened), not a measurement to average or plot.
EPOCH_RANGE = (1e9, 4e9)


@dataclass(frozen=True)
class Selection:
    """The columns of the people's table: varying params, constants, result fields."""

    params: list[str]
    constants: dict[str, Any]
    results: list[str]
    #: `report.columns` entries that name no result field (a typo, or a field not written).
    unknown: list[str] = field(default_factory=list)
    #: Numeric result fields left out by default: timestamps and the `measure:` bounds.
    hidden: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PlotAxes:
    """What the report's plots put on x, and which parameters split or average lines."""

    x: str
    group: list[str]
    averaged: list[str]


def _hashable(value: Any) -> Any:
    return (
        json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict | list) else value
    )


def _values(rows: Sequence[Mapping[str, Any]], column: str) -> list[Any]:
    return [_hashable(row.get(column)) for row in rows]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _result_fields(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(k.removeprefix(RESULT) for k in row if k.startswith(RESULT)))
    return list(names)


def is_timestamp(values: Sequence[Any]) -> bool:
    """Whether numbers are unix times: some, and every one within `EPOCH_RANGE`."""
    low, high = EPOCH_RANGE
    numbers = [v for v in values if _is_number(v)]
    return bool(numbers) and len(numbers) == len(values) and all(low <= v <= high for v in numbers)


def window_bounds(study: Mapping[str, Any]) -> set[str]:
    """The result fields the study's `measure:` names as its window's start and end."""
    measure = study.get("measure") or {}
    if not isinstance(measure, Mapping):
        return set()
    return {str(measure[k]).removeprefix(RESULT) for k in ("start", "end") if measure.get(k)}


def _numeric_results(
    rows: Sequence[Mapping[str, Any]], params: set[str], bounds: set[str]
) -> tuple[list[str], list[str]]:
    """(measurements, hidden): numeric result fields with a value somewhere, leaving out
    echoes of parameters; timestamps and the window's bounds go to `hidden`."""
    ok = [r for r in rows if r.get("status") == "succeeded"] or list(rows)
    chosen: list[str] = []
    hidden: list[str] = []
    for name in _result_fields(ok):
        values = [r.get(RESULT + name) for r in ok if r.get(RESULT + name) is not None]
        if name in params or not values or not all(_is_number(v) for v in values):
            continue
        (hidden if name in bounds or is_timestamp(values) else chosen).append(name)
    return chosen, hidden


def select_columns(
    results: StudyResults, rows: Sequence[Mapping[str, Any]], spec: ReportSpec | None = None
) -> Selection:
    """The table's columns for these rows (flat rows of `flat_row`)."""
    spec = spec if spec is not None else results.report
    varying, constants = [], {}
    for name in results.param_order():
        values = _values(rows, PARAM + name)
        present = all(PARAM + name in row for row in rows)
        if present and len(set(values)) == 1:
            constants[name] = rows[0][PARAM + name]
        else:
            varying.append(name)
    known = _result_fields(rows)
    measured, hidden = _numeric_results(
        rows, set(results.param_order()), window_bounds(results.study)
    )
    if spec.columns:
        # The study's own choice is shown as asked, a timestamp included.
        chosen = [c.removeprefix(RESULT) for c in spec.columns]
        unknown = [c for c in chosen if c not in known]
        shown = [c for c in chosen if c in known]
        return Selection(varying, constants, shown, unknown, [h for h in hidden if h not in shown])
    return Selection(varying, constants, measured[:DEFAULT_RESULT_COLUMNS], hidden=hidden)


def plot_axes(
    selection: Selection, rows: Sequence[Mapping[str, Any]], spec: ReportSpec
) -> PlotAxes:
    """x: the study's choice, else the varying numeric parameter with most values.

    Never the cycle by default: cycles repeat a config, and each point is their mean
    with its 95% interval. With no varying parameter, x is the first constant one (one
    point per result); only a study with no parameters at all falls back to the cycle.
    Lines: one per value of `spec.group` (other varying parameters averaged), or
    by default one per combination of every other varying parameter.
    """
    varying = list(selection.params)
    x = spec.x
    if x is None:
        numeric = [
            p
            for p in varying
            if all(_is_number(v) for v in _values(rows, _column(p)) if v is not None)
        ]
        ranked = numeric or varying
        if ranked:
            x = max(ranked, key=lambda p: len(set(_values(rows, _column(p)))))
        else:
            x = next(iter(selection.constants), "cycle")
    rest = [p for p in varying if p != x]
    if spec.group is not None:
        return PlotAxes(x, [spec.group], [p for p in rest if p != spec.group])
    return PlotAxes(x, rest, [])


def _column(name: str) -> str:
    return "cycle" if name == "cycle" else PARAM + name
