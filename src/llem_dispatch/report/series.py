"""The report's plotted numbers: one line per group, one point per x value, the mean over cycles.

Pure Python over the report's rows, so the page and its embedded data agree; each
point's 95% interval is `study.stats.describe`'s, the one `results --stats` gives.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llem_dispatch.report.data import format_param
from llem_dispatch.report.selection import PlotAxes
from llem_dispatch.study.stats import describe

__all__ = ["Value", "config_ratios", "energy_ratio", "group_label", "line_series", "x_value"]

#: What a plot reads from one of the report's rows (None: nothing to plot).
Value = Callable[[Mapping[str, Any]], float | None]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def x_value(row: Mapping[str, Any], name: str) -> Any:
    """A row's value of a parameter (or of its cycle) as the plots place it."""
    return row["cycle"] if name == "cycle" else row["config"].get(name)


def group_label(values: Mapping[str, Any]) -> str:
    """'batch=8, dtype=bf16' (the study file's spelling); 'all' for no parameters."""
    return ", ".join(f"{k}={format_param(v)}" for k, v in values.items()) or "all"


def _x_order(value: Any) -> tuple[bool, Any]:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return (not number, value if number else json.dumps(value, sort_keys=True, default=str))


def line_series(
    rows: Sequence[Mapping[str, Any]], axes: PlotAxes, value: Value
) -> list[dict[str, Any]]:
    """One line per value of `axes.group`; per x value, the mean over its succeeded cycles.

    Each line is `{"label", "group", "points"}`; each point `{"x", "mean", "std",
    "ci95", "n", "disturbed"}`, where `ci95` is the Student-t half-width (None below
    two values) and `disturbed` counts the cycles in it whose measured window a
    neighbour's unpaused preparation overlapped.
    """
    lines: dict[str, dict[str, Any]] = {}
    for row in rows:
        number = value(row) if row["status"] == "succeeded" else None
        if number is None:
            continue
        group = {g: x_value(row, g) for g in axes.group}
        line = lines.setdefault(group_label(group), {"group": group, "by_x": {}})
        x = x_value(row, axes.x)
        # The x as JSON: a parameter may be a list or a dict (unhashable).
        point = line["by_x"].setdefault(
            json.dumps(x, sort_keys=True, default=str), {"x": x, "values": [], "disturbed": 0}
        )
        point["values"].append(number)
        point["disturbed"] += row.get("disturbed") is True
    out = []
    for label, line in lines.items():
        points = []
        for point in sorted(line["by_x"].values(), key=lambda p: _x_order(p["x"])):
            summary = describe(point["values"])
            points.append(
                {
                    "x": point["x"],
                    "mean": summary.mean,
                    "std": summary.std,
                    "ci95": summary.ci95,
                    "n": summary.n,
                    "disturbed": point["disturbed"],
                }
            )
        out.append({"label": label, "group": line["group"], "points": points})
    return out


def energy_ratio(row: Mapping[str, Any]) -> float | None:
    """Telemetry's energy over the measured window / the workload's own figure for it.

    None unless both sides are there: a study without `measure:` (or without its
    `energy`), a run without telemetry, or a window telemetry could not cover.
    """
    energy = row.get("energy") or {}
    if _number(energy.get("window_j")) is None or not _number(energy.get("reported_j")):
        return None
    return _number(energy.get("ratio"))


def _mean(values: Sequence[Any]) -> float | None:
    return describe([v for v in map(_number, values) if v is not None]).mean


def config_ratios(rows: Sequence[Mapping[str, Any]], params: Sequence[str]) -> list[dict[str, Any]]:
    """Per config (in the rows' order), the energy ratio over its succeeded cycles.

    Each: `config_hash`, `params` (the varying ones), `n`, `mean`, `std`, `ci95`, `min`,
    `max` of the ratio, the mean `window_j` (telemetry) and `reported_j` (workload),
    and `disturbed` (cycles whose window a neighbour's preparation overlapped). A
    config with no cycle that has both sides is left out.
    """
    configs: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["status"] == "succeeded" and energy_ratio(row) is not None:
            configs.setdefault(str(row.get("config_hash") or row["key"]), []).append(row)
    out = []
    for key, cycles in configs.items():
        ratios = [r for r in map(energy_ratio, cycles) if r is not None]
        summary = describe(ratios)
        out.append(
            {
                "config_hash": key,
                "params": {p: cycles[0]["config"].get(p) for p in params},
                "n": summary.n,
                "mean": summary.mean,
                "std": summary.std,
                "ci95": summary.ci95,
                "min": min(ratios),
                "max": max(ratios),
                "window_j": _mean([r["energy"].get("window_j") for r in cycles]),
                "reported_j": _mean([r["energy"].get("reported_j") for r in cycles]),
                "disturbed": sum(r.get("disturbed") is True for r in cycles),
            }
        )
    return out
