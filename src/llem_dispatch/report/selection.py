"""Which columns a person scans first, and which axes the plots use.

The study's `report:` section says; otherwise: the parameters that vary (the
constant ones go to a header line), the first few numeric result fields, and
the varying numeric parameter with the most values on the x axis.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llem_dispatch.report.data import PARAM, RESULT, StudyResults
from llem_dispatch.study import ReportSpec

__all__ = ["DEFAULT_RESULT_COLUMNS", "PlotAxes", "Selection", "plot_axes", "select_columns"]

#: How many result fields the table shows when the study does not choose.
DEFAULT_RESULT_COLUMNS = 3


@dataclass(frozen=True)
class Selection:
    """The columns of the people's table: varying params, constants, result fields."""

    params: list[str]
    constants: dict[str, Any]
    results: list[str]
    #: `report.columns` entries that name no result field (a typo, or a field not written).
    unknown: list[str] = field(default_factory=list)


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


def _default_results(rows: Sequence[Mapping[str, Any]], params: set[str]) -> list[str]:
    """Numeric result fields with a value somewhere, leaving out echoes of parameters."""
    ok = [r for r in rows if r.get("status") == "succeeded"] or list(rows)
    chosen = []
    for name in _result_fields(ok):
        values = [r.get(RESULT + name) for r in ok if r.get(RESULT + name) is not None]
        if name in params or not values or not all(_is_number(v) for v in values):
            continue
        chosen.append(name)
    return chosen[:DEFAULT_RESULT_COLUMNS]


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
    if spec.columns:
        chosen = [c.removeprefix(RESULT) for c in spec.columns]
        unknown = [c for c in chosen if c not in known]
        return Selection(varying, constants, [c for c in chosen if c in known], unknown)
    return Selection(varying, constants, _default_results(rows, set(results.param_order())))


def plot_axes(
    selection: Selection, rows: Sequence[Mapping[str, Any]], spec: ReportSpec
) -> PlotAxes:
    """x: the study's choice, else the varying numeric parameter with most values, else cycle.

    Lines: one per value of `spec.group` (other varying parameters averaged), or
    by default one per combination of every other varying parameter.
    """
    varying = list(selection.params)
    if len({row.get("cycle") for row in rows}) > 1:
        varying.append("cycle")
    x = spec.x
    if x is None:
        numeric = [
            p
            for p in varying
            if all(_is_number(v) for v in _values(rows, _column(p)) if v is not None)
        ]
        ranked = numeric or varying
        x = max(ranked, key=lambda p: len(set(_values(rows, _column(p))))) if ranked else "cycle"
    rest = [p for p in varying if p != x]
    if spec.group is not None:
        return PlotAxes(x, [spec.group], [p for p in rest if p != spec.group])
    return PlotAxes(x, rest, [])


def _column(name: str) -> str:
    return "cycle" if name == "cycle" else PARAM + name
