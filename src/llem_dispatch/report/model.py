"""What a report shows, as plain JSON-ready data: summary, timeline bars, rows, failures,
and the plotted means over cycles (results, and telemetry's energy over the workload's).

The HTML report renders this and embeds it whole (`<script id="llem-report-data">`),
so what a reader sees and what a script can extract are the same numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llem_dispatch.report.data import (
    RESULT,
    WINDOW_FIELDS,
    StudyResults,
    failure_info,
    flat_row,
    format_param,
    format_value,
    short_keys,
    sort_records,
    window_disturbed,
)
from llem_dispatch.report.selection import PlotAxes, Selection, plot_axes, select_columns
from llem_dispatch.report.series import config_ratios, energy_ratio, line_series
from llem_dispatch.report.timeline import EXPERIMENT_KINDS, Bar, Timeline, build_timeline
from llem_dispatch.report.traces import FIELDS, Trace, mean_sm_util, read_traces
from llem_dispatch.study import ReportSpec

__all__ = ["ReportData", "build_report_data", "describe", "iso"]

#: Result fields shown when hovering a bar, after the selected ones.
HOVER_RESULTS = 8


def iso(epoch: float) -> str:
    """Epoch seconds as the UTC time plotly's date axis reads ('2026-01-01 12:00:00.123')."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows; `as_json()` is what it embeds."""

    summary: dict[str, Any]
    bars: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    selection: Selection
    axes: PlotAxes
    lanes: list[str]
    sessions: list[dict[str, Any]]
    #: GPU telemetry per GPU id: "t" (plotly's UTC times) and each sampled figure.
    traces: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    #: Per plotted result field, its lines (`series.line_series`): means over cycles.
    plots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Telemetry's window energy over the workload's: `field` (the workload's, from
    #: `measure.energy`), `lines` (as `plots`) and `configs` (`series.config_ratios`);
    #: empty where no record has both.
    energy: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The embedded data: summary, bars, rows, failures, columns, and what is plotted."""
        return {
            "summary": self.summary,
            "bars": self.bars,
            "rows": self.rows,
            "failures": self.failures,
            "columns": {
                "params": self.selection.params,
                "constants": self.selection.constants,
                "results": self.selection.results,
            },
            "axes": {"x": self.axes.x, "group": self.axes.group, "averaged": self.axes.averaged},
            "lanes": self.lanes,
            "sessions": self.sessions,
            "traces": self.traces,
            "plots": self.plots,
            "energy": self.energy,
        }


def _summary(results: StudyResults, timeline: Timeline, traces: dict[str, Trace]) -> dict[str, Any]:
    counts = Counter(str(r.get("status")) for r in results.records)
    planned = results.facts.get("experiments")
    # Only records that say (results from before the isolation policy do not).
    windows = [d for r in results.records if (d := window_disturbed(r)) is not None]
    return {
        "study": results.name,
        "results_dir": str(results.path.resolve()),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runner": results.facts.get("runner"),
        "virtual_gpus": results.facts.get("virtual_gpus"),
        "planned": planned,
        "recorded": len(results.records),
        "not_run": max(0, planned - len(results.records)) if isinstance(planned, int) else None,
        "counts": {kind: counts.get(kind, 0) for kind in EXPERIMENT_KINDS},
        "retries": timeline.retries,
        "sessions": len(timeline.sessions),
        "resumes": sum(s.resumed for s in timeline.sessions),
        "wall_s": round(timeline.wall_s, 3),
        "gpus": timeline.gpus,
        "busy_gpu_s": round(timeline.busy_gpu_s, 3),
        "cooldown_gpu_s": round(timeline.cooldown_gpu_s, 3),
        "before_work_gpu_s": round(timeline.before_work_gpu_s, 3),
        # Occupancy: the share of GPU time held by an experiment (what the timeline shows);
        # `utilisation` is its older name. What the GPUs did is the sampled SM utilisation.
        "occupancy": timeline.utilisation,
        "utilisation": timeline.utilisation,
        "sm_util": mean_sm_util(traces),
        "windows_checked": len(windows),
        "windows_disturbed": sum(windows),
    }


def _hover(
    bar: Bar, record: Mapping[str, Any] | None, short: str, selection: Selection
) -> dict[str, Any]:
    config = dict((record or {}).get("config") or {})
    row = flat_row(record) if record else {}
    names = [*selection.results]
    names += [k.removeprefix(RESULT) for k in row if k.startswith(RESULT) and k not in names]
    names = [n for n in names if n not in selection.hidden]
    shown = {n: row.get(RESULT + n) for n in names if row.get(RESULT + n) is not None}
    return {
        "config": config,
        "result": dict(list(shown.items())[: len(selection.results) + HOVER_RESULTS]),
        "status": (record or {}).get("status"),
        "short": short,
    }


def _bars(
    timeline: Timeline,
    records: Mapping[str, Mapping[str, Any]],
    shorts: Mapping[str, str],
    selection: Selection,
) -> list[dict[str, Any]]:
    out = []
    for bar in sorted(timeline.bars, key=lambda b: (b.start, b.lane)):
        short = shorts.get(bar.key, bar.key[:8])
        out.append(
            {
                "key": bar.key,
                "lane": bar.lane,
                "start": iso(bar.start),
                "end": iso(bar.end),
                "seconds": round(bar.seconds, 3),
                "kind": bar.kind,
                "attempt": bar.attempt,
                "session": bar.session,
                "error": bar.error,
                **_hover(bar, records.get(bar.key), short, selection),
            }
        )
    return out


def _rows(
    results: StudyResults, selection: Selection, shorts: Mapping[str, str]
) -> list[dict[str, Any]]:
    rows = []
    for record in sort_records(results.records, results.param_order()):
        flat = flat_row(record)
        rows.append(
            {
                "key": flat["key"],
                "config_hash": flat["config_hash"],
                "short": shorts.get(str(flat["key"])),
                "status": flat["status"],
                "gpu_ids": flat["gpu_ids"],
                "node": flat.get("node"),
                "duration_s": flat["duration_s"],
                "cycle": flat["cycle"],
                "config": dict(record.get("config") or {}),
                "results": {c: flat.get(RESULT + c) for c in selection.results},
                "error": flat["error"],
                "disturbed": flat["window_disturbed"],
                "window": {
                    **({"cpus": flat["cpus"]} if flat["cpus"] else {}),
                    **{f: flat[f] for f in WINDOW_FIELDS if flat[f] is not None},
                },
                "energy": {
                    name: flat.get(f"energy.{name}") for name in ("window_j", "reported_j", "ratio")
                },
            }
        )
    return rows


def _failures(
    results: StudyResults, selection: Selection, shorts: Mapping[str, str]
) -> list[dict[str, Any]]:
    out = []
    for record in sort_records(results.records, results.param_order()):
        if record.get("status") == "succeeded":
            continue
        kind, message, fix = failure_info(record)
        config = record.get("config") or {}
        out.append(
            {
                "key": record.get("key"),
                "short": shorts.get(str(record.get("key"))),
                "status": record.get("status"),
                "params": {p: config.get(p) for p in selection.params},
                "error": kind,
                "message": message,
                "fix": fix,
                "exchange_dir": record.get("exchange_dir"),
                "node": flat_row(record).get("node"),
                "attempts": record.get("attempts"),
            }
        )
    return out


def build_report_data(results: StudyResults, spec: ReportSpec | None = None) -> ReportData:
    """The report's content for a results dir read by `read_results`."""
    spec = spec if spec is not None else results.report
    flat = [flat_row(r) for r in results.records]
    selection = select_columns(results, flat, spec)
    axes = plot_axes(selection, flat, spec)
    timeline = build_timeline(results)
    traces = read_traces(results.path)
    shorts = short_keys(results.records)
    records = {str(r.get("key")): r for r in results.records}
    rows = _rows(results, selection, shorts)
    sessions = [
        {
            "index": s.index,
            "start": iso(s.start),
            "end": iso(s.end),
            "start_s": s.start,
            "end_s": s.end,
            "resumed": s.resumed,
        }
        for s in timeline.sessions
    ]
    return ReportData(
        _summary(results, timeline, traces),
        _bars(timeline, records, shorts, selection),
        rows,
        _failures(results, selection, shorts),
        selection,
        axes,
        timeline.lanes,
        sessions,
        {
            gpu: {"t": [iso(t) for t in trace.t], **{n: trace.values(n) for n in FIELDS}}
            for gpu, trace in traces.items()
        },
        {c: line_series(rows, axes, _result_value(c)) for c in selection.results},
        _energy(results, rows, selection, axes),
    )


def _result_value(column: str) -> Callable[[Mapping[str, Any]], float | None]:
    def value(row: Mapping[str, Any]) -> float | None:
        number = row["results"].get(column)
        if isinstance(number, bool) or not isinstance(number, int | float):
            return None
        return float(number)

    return value


def _energy(
    results: StudyResults, rows: list[dict[str, Any]], selection: Selection, axes: PlotAxes
) -> dict[str, Any]:
    """Telemetry over the workload's energy, per config and along the plots' axes."""
    configs = config_ratios(rows, selection.params)
    if not configs:
        return {}
    measure = results.study.get("measure") or {}
    reported = measure.get("energy") if isinstance(measure, Mapping) else None
    return {
        "field": str(reported).removeprefix(RESULT) if reported else None,
        "lines": line_series(rows, axes, energy_ratio),
        "configs": configs,
    }


def describe(values: Mapping[str, Any], *, rounded: bool = False) -> str:
    """'size=128 · dtype=float64' for hover texts and table cells (results `rounded`)."""
    show = format_value if rounded else format_param
    return " · ".join(f"{k}={show(v)}" for k, v in values.items())
