"""The HTML report: one self-contained file (plotly.js and the data inlined) per results dir.

Sections: summary (counts, wall time, GPU utilisation), the per-GPU timeline,
result fields plotted against a parameter, failures, and every experiment.
Plotly draws the charts (the `report` extra, plotly alone); it is imported only here.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llem_dispatch.report.data import (
    format_duration,
    format_param,
    format_value,
    read_results,
    require_extra,
)
from llem_dispatch.report.model import ReportData, build_report_data, describe
from llem_dispatch.study import ReportSpec

__all__ = ["KIND_STYLE", "render_report", "write_report"]

#: Legend label and colour of each bar kind, in legend order.
KIND_STYLE: dict[str, tuple[str, str]] = {
    "succeeded": ("succeeded", "#2e9e5b"),
    "failed": ("failed (reported by the experiment)", "#e8822a"),
    "error": ("error (infrastructure)", "#d23c3c"),
    "cancelled": ("cancelled", "#8a8a8a"),
    "retried": ("attempt retried", "#f2c14e"),
    "unfinished": ("no end recorded", "#b58bd6"),
    "cooldown": ("cooldown", "#d9dde3"),
    "before_work": ("before its first measured work", "#a7d8b9"),
}
_STATUS_CLASS = {"succeeded": "ok", "failed": "bad", "error": "bad", "cancelled": "dim"}
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
_E = html.escape


def _lane_label(lane: str) -> str:
    if lane.startswith("CPU "):
        return lane
    node, _, gpu = lane.rpartition(":")
    # Plotly reads tick labels and trace names as a little HTML: escape what we pass.
    return _E(f"{node} GPU {gpu}" if node else f"GPU {gpu}")


def _bar_hover(bar: Mapping[str, Any]) -> str:
    lines = [
        f"<b>{_E(str(bar['short']))}</b> {_E(bar['kind'])} (attempt {bar['attempt']})",
        f"{_lane_label(bar['lane'])} · {bar['start'][11:23]} · {format_duration(bar['seconds'])}",
    ]
    if bar["config"]:
        lines.append(_E(describe(bar["config"])))
    if bar["result"] and bar["kind"] not in {"cooldown", "before_work"}:
        lines.append(_E(describe(bar["result"], rounded=True)))
    if bar.get("error"):
        lines.append(f"error: {_E(str(bar['error']))}")
    return "<br>".join(lines)


#: The telemetry rows under the timeline: (figure, axis title).
TRACE_ROWS = (("power_w", "power (W)"), ("temperature_c", "temperature (°C)"))
_TRACE_COLOURS = ("#1f6fb2", "#c2410c", "#6d28d9", "#0f766e", "#a16207", "#be185d", "#4d7c0f")


def _timeline_figure(data: ReportData, go: Any, subplots: Any) -> Any:
    lanes = [_lane_label(lane) for lane in data.lanes]
    bars_height = max(220, 34 * len(lanes) + 130)
    rows = 1 + (len(TRACE_ROWS) if data.traces else 0)
    if rows > 1:
        # One time axis for bars and traces: a power step lines up with its experiment.
        fig = subplots.make_subplots(
            rows=rows,
            cols=1,
            shared_xaxes=True,
            vertical_spacing=0.03,
            row_heights=[bars_height, *([170] * (rows - 1))],
        )
    else:
        fig = go.Figure()
    place = {"row": 1, "col": 1} if rows > 1 else {}
    for kind, (label, colour) in KIND_STYLE.items():
        bars = [b for b in data.bars if b["kind"] == kind]
        if not bars:
            continue
        fig.add_trace(
            go.Bar(
                name=label,
                orientation="h",
                y=[_lane_label(b["lane"]) for b in bars],
                base=[b["start"] for b in bars],
                x=[b["seconds"] * 1000 for b in bars],
                marker={
                    "color": colour,
                    "line": {"width": 0.5, "color": "white"},
                    "pattern": {"shape": "/" if kind in {"retried", "unfinished"} else ""},
                },
                customdata=[_bar_hover(b) for b in bars],
                hovertemplate="%{customdata}<extra></extra>",
                text=[b["short"] if kind not in {"cooldown", "before_work"} else "" for b in bars],
                textposition="inside",
                insidetextanchor="middle",
                textangle=0,
                textfont={"size": 10},
            ),
            **place,
        )
    if rows > 1:
        _add_traces(fig, data, go)
    breaks = _mark_sessions(fig, data)
    fig.update_layout(
        barmode="overlay",
        height=bars_height + 170 * (rows - 1),
        margin={"l": 10, "r": 10, "t": 40, "b": 40},
        legend={"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"},
        yaxis={"categoryorder": "array", "categoryarray": lanes[::-1], "automargin": True},
        plot_bgcolor="#fafbfc",
        uniformtext={"minsize": 8, "mode": "hide"},
    )
    fig.update_xaxes(
        type="date",
        rangebreaks=breaks,
        # The runs' span exactly (autorange pads oddly once pauses are cut out).
        range=[data.sessions[0]["start"], data.sessions[-1]["end"]] if data.sessions else None,
    )
    fig.update_xaxes(title_text="time (UTC)", **({"row": rows, "col": 1} if rows > 1 else {}))
    return fig


def _add_traces(fig: Any, data: ReportData, go: Any) -> None:
    """Each GPU's sampled power and temperature, one row each, under the bars."""
    for index, (gpu, trace) in enumerate(data.traces.items()):
        colour = _TRACE_COLOURS[index % len(_TRACE_COLOURS)]
        for row, (name, title) in enumerate(TRACE_ROWS, start=2):
            points = [(t, v) for t, v in zip(trace["t"], trace[name], strict=True) if v is not None]
            if not points:
                continue
            fig.add_trace(
                go.Scattergl(
                    name=f"{_lane_label(gpu)} {title.split(' ')[0]}",
                    legendgroup=f"gpu-{gpu}",
                    x=[p[0] for p in points],
                    y=[p[1] for p in points],
                    mode="lines",
                    line={"width": 1.2, "color": colour, "dash": "solid" if row == 2 else "dot"},
                    hovertemplate=f"{_lane_label(gpu)}: %{{y:.1f}} {_E(title)}<extra></extra>",
                ),
                row=row,
                col=1,
            )
            fig.update_yaxes(title_text=_E(title), automargin=True, row=row, col=1)


def _mark_sessions(fig: Any, data: ReportData) -> list[dict[str, Any]]:
    """A dotted line where each --resume started; long pauses between runs cut out."""
    breaks = []
    wall = max(1.0, float(data.summary["wall_s"]))
    for before, session in zip(data.sessions, data.sessions[1:], strict=False):
        fig.add_shape(
            type="line",
            x0=session["start"],
            x1=session["start"],
            yref="paper",
            y0=0,
            y1=1,
            line={"color": "#555", "dash": "dot", "width": 1},
        )
        fig.add_annotation(
            x=session["start"],
            y=1,
            yref="paper",
            text=" resumed",
            showarrow=False,
            xanchor="left",
            yanchor="top",
            font={"size": 10, "color": "#555"},
        )
        pause = session["start_s"] - before["end_s"]
        if pause > max(5.0, 0.05 * wall):
            # Keep a sliver of the pause so the cut is visible as a gap.
            margin = 0.02 * wall
            breaks.append({"values": [before["end"]], "dvalue": (pause - margin) * 1000})
    return breaks


def _plot_x(x: Any) -> Any:
    return x if isinstance(x, int | float) and not isinstance(x, bool) else format_param(x)


def _point_hover(point: Mapping[str, Any]) -> str:
    """The point's mean, interval and cycles (numbers only: nothing to escape)."""
    spread = f" ± {format_value(point['ci95'])} (95% CI)" if point["ci95"] is not None else ""
    text = f"mean {format_value(point['mean'])}{spread}<br>n={point['n']} cycles"
    if point["disturbed"]:
        text += f", {point['disturbed']} disturbed (a neighbour prepared in its window)"
    return text


def _line_figure(
    lines: list[dict[str, Any]], x: str, title: str, go: Any, reference: float | None = None
) -> Any:
    """Per line, the mean over cycles at each x with its 95% CI as error bars.

    A point holding a disturbed window (a neighbour's unpaused preparation inside
    it) is drawn as a crossed ring, so it is seen before it is believed.
    """
    fig = go.Figure()
    for line in lines:
        points = line["points"]
        spread = [p["ci95"] or 0.0 for p in points]
        fig.add_trace(
            go.Scatter(
                name=_E(line["label"]),
                x=[_plot_x(p["x"]) for p in points],
                y=[p["mean"] for p in points],
                customdata=[_point_hover(p) for p in points],
                error_y={"type": "data", "array": spread, "visible": any(spread)},
                mode="lines+markers",
                marker={
                    "symbol": ["circle-x-open" if p["disturbed"] else "circle" for p in points],
                    "size": [12 if p["disturbed"] else 7 for p in points],
                },
                hovertemplate=f"{_E(line['label'])}<br>{_E(x)}=%{{x}}<br>"
                "%{customdata}<extra></extra>",
            )
        )
    if reference is not None:
        fig.add_hline(y=reference, line={"color": "#8a8a8a", "dash": "dot", "width": 1})
    xs_all = [p["x"] for line in lines for p in line["points"] if _is_number(p["x"])]
    ys_all = [p["mean"] for line in lines for p in line["points"]]
    fig.update_layout(
        title={"text": _E(title), "font": {"size": 14}},
        height=360,
        margin={"l": 10, "r": 10, "t": 40, "b": 40},
        xaxis={"title": _E(x), "type": "log" if _spans_decades(xs_all) else "-"},
        yaxis={
            "title": _E(title),
            "automargin": True,
            "type": "log" if _spans_decades(ys_all) else "-",
        },
        legend={"font": {"size": 10}},
        plot_bgcolor="#fafbfc",
    )
    return fig


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _spans_decades(values: list[Any]) -> bool:
    """Positive values over two decades or more read better on a log axis."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


def _figure_html(fig: Any) -> str:
    return str(
        fig.to_html(
            full_html=False, include_plotlyjs=False, config=_PLOT_CONFIG, default_width="100%"
        )
    )


def _cards(summary: Mapping[str, Any]) -> str:
    counts = summary["counts"]
    util = summary["utilisation"]
    gpus = summary["gpus"]
    cards = [
        (
            "experiments",
            f"{summary['recorded']}"
            + (f" of {summary['planned']}" if summary.get("not_run") else ""),
            "",
        ),
        ("succeeded", str(counts["succeeded"]), "ok"),
        ("failed", str(counts["failed"]), "bad" if counts["failed"] else ""),
        (
            "errors",
            str(counts["error"] + counts["cancelled"]),
            "bad" if counts["error"] + counts["cancelled"] else "",
        ),
        ("retries", str(summary["retries"]), ""),
        (
            "wall time",
            format_duration(summary["wall_s"]),
            f"{summary['sessions']} runs" if summary["sessions"] > 1 else "",
        ),
        (
            "GPUs",
            "-" if gpus is None else str(gpus),
            "virtual" if summary.get("virtual_gpus") else "",
        ),
        ("GPU occupancy", "-" if util is None else f"{util:.0%}", "held GPU-s / (GPUs x wall)"),
    ]
    if summary.get("sm_util") is not None:
        cards.append(("SM utilisation", f"{summary['sm_util']:.0%}", "sampled (NVML), mean"))
    if summary["cooldown_gpu_s"]:
        share = summary["cooldown_gpu_s"] / max(1e-9, (gpus or 1) * summary["wall_s"])
        cards.append(("in cooldown", f"{share:.0%}", "of GPU time"))
    if summary.get("before_work_gpu_s"):
        share = summary["before_work_gpu_s"] / max(1e-9, (gpus or 1) * summary["wall_s"])
        cards.append(("before first work", f"{share:.0%}", "of GPU time, inside runs"))
    disturbed = summary.get("windows_disturbed") or 0
    if summary.get("windows_checked"):
        what = "with a neighbour's unpaused prepare inside"
        cards.append(("disturbed windows", f"{disturbed} of {summary['windows_checked']}", what))
    items = "".join(
        f'<div class="card {_card_class(label, note, disturbed)}">'
        f"<div class=label>{_E(label)}</div><div class=value>{_E(value)}</div>"
        f"<div class=note>{_E(note) if note not in {'ok', 'bad'} else ''}</div></div>"
        for label, value, note in cards
    )
    return f'<div class="cards">{items}</div>'


def _card_class(label: str, note: str, disturbed: int) -> str:
    if note in {"ok", "bad"}:
        return note
    return "bad" if label == "disturbed windows" and disturbed else ""


def _table(headers: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    head = "".join(
        f'<th class="{"num" if i in numeric else ""}">{_E(h)}</th>' for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="{"num" if i in numeric else ""}">{cell}</td>' for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _failures_table(data: ReportData) -> str:
    if not data.failures:
        return "<p class=hint>No failures.</p>"
    rows = [
        [
            f'<span title="{_E(str(f["key"]))}">{_E(str(f["short"]))}</span>',
            _E(describe(f["params"])),
            f'<span class="status bad">{_E(str(f["error"] or f["status"]))}</span>',
            _E((f["message"] or "")[:400]),
            _E(f["fix"] or ""),
            "<code>"
            + _E((f"{f['node']}: " if f.get("node") else "") + (f["exchange_dir"] or ""))
            + "</code>",
        ]
        for f in data.failures
    ]
    headers = ["key", "parameters", "error", "message", "fix", "exchange dir (kept)"]
    return _table(headers, rows, set())


def _window_cell(row: Mapping[str, Any]) -> str:
    """The measured window's flag: what else ran while it measured, in its tooltip."""
    if row.get("disturbed") is None:
        return ""
    details = describe(row.get("window") or {}, rounded=True)
    if row["disturbed"]:
        return f'<span class="status bad" title="{_E(details)}">&#9888; disturbed</span>'
    return f'<span class="status dim" title="{_E(details)}">clean</span>'


def _experiments_table(data: ReportData) -> str:
    selection = data.selection
    # The window column only where some record says (results from before it say nothing).
    flagged = any(row.get("disturbed") is not None for row in data.rows)
    window = ["window"] if flagged else []
    headers = ["key", "status", "GPU", "duration", *window, *selection.params, *selection.results]
    rows = []
    for row in data.rows:
        status = _E(str(row["status"])) + (f": {_E(row['error'])}" if row.get("error") else "")
        rows.append(
            [
                f'<span title="{_E(str(row["key"]))}">{_E(str(row["short"]))}</span>',
                f'<span class="status {_STATUS_CLASS.get(str(row["status"]), "")}">{status}</span>',
                _E(((row["node"] + ":") if row.get("node") else "") + row["gpu_ids"]),
                format_duration(row["duration_s"]),
                *([_window_cell(row)] if flagged else []),
                *(_E(format_param(row["config"].get(p))) for p in selection.params),
                *(_E(format_value(row["results"].get(c))) for c in selection.results),
            ]
        )
    first = 4 + len(window)  # the first parameter's column
    numeric = {3, *range(first + len(selection.params), len(headers))}
    for index, param in enumerate(selection.params):
        values = [row["config"].get(param) for row in data.rows]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            numeric.add(first + index)
    table = _table(headers, rows, numeric)
    if len(rows) > 200:
        return f"<details><summary>{len(rows)} experiments</summary>{table}</details>"
    return table


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;
background:#fff}
main{max-width:1360px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:22px;margin:0 0 2px}h2{font-size:17px;margin:28px 0 6px}
.sub,.hint{color:#5b6472;font-size:13px;margin:2px 0 8px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #e1e5ea;border-radius:8px;padding:8px 14px;min-width:110px}
.card .label{color:#5b6472;font-size:12px}.card .value{font-size:20px;font-weight:600}
.card .note{color:#8a93a0;font-size:11px;min-height:14px}
.card.ok .value{color:#2e9e5b}.card.bad .value{color:#d23c3c}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
.grid>div{min-width:0}
table{border-collapse:collapse;font-size:13px}
th,td{padding:4px 8px;border-bottom:1px solid #eceff3;text-align:left;vertical-align:top}
th{background:#f5f7f9;font-weight:600;position:sticky;top:0}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.status.ok{color:#2e9e5b}.status.bad{color:#d23c3c;font-weight:600}.status.dim{color:#8a8a8a}
code{font-size:12px;word-break:break-all}
"""


def _axes_hint(data: ReportData) -> str:
    axes = data.axes
    parts = [f"x: {axes.x}"]
    if axes.group:
        parts.append("one line per " + ", ".join(axes.group))
    if axes.averaged:
        parts.append("averaged over " + ", ".join(axes.averaged))
    points = [p for lines in data.plots.values() for line in lines for p in line["points"]]
    if any(p["n"] > 1 for p in points):
        parts.append(
            "points: the mean over cycles, error bars: its 95% confidence interval "
            "(Student t, as `results --stats`)"
        )
    if any(p["disturbed"] for p in points):
        parts.append("crossed rings: points holding a disturbed window")
    return " · ".join(parts)


def _results_section(data: ReportData, go: Any) -> str:
    if not data.selection.results:
        return "<p class=hint>No numeric result fields to plot.</p>"
    figures = "".join(
        f"<div>{_figure_html(_line_figure(data.plots[column], data.axes.x, column, go))}</div>"
        for column in data.selection.results
    )
    notes = []
    if data.selection.unknown:
        notes.append(f"report.columns names no result field: {', '.join(data.selection.unknown)}")
    if data.selection.hidden:
        notes.append(
            "not plotted (timestamps, or the measured window's bounds): "
            + ", ".join(data.selection.hidden)
        )
    warn = "".join(f"<p class=hint>{_E(n)}</p>" for n in notes)
    return f"<p class=hint>{_E(_axes_hint(data))}</p>{warn}<div class=grid>{figures}</div>"


def _energy_section(data: ReportData, go: Any) -> str:
    """Telemetry's energy over the measured window / the workload's own figure, per config."""
    energy = data.energy
    if not energy:
        return ""
    workload = f"result.{energy['field']}" if energy.get("field") else "the workload's figure"
    params = data.selection.params
    headers = [*params, "n", "telemetry (J)", "workload (J)", "ratio", "± ci95", "std", "range"]
    rows = [
        [
            *(_E(format_param(c["params"].get(p))) for p in params),
            str(c["n"]) + (f" ({c['disturbed']} disturbed)" if c["disturbed"] else ""),
            *(_E(format_value(c[k])) for k in ("window_j", "reported_j", "mean", "ci95", "std")),
            _E(f"{format_value(c['min'])} to {format_value(c['max'])}"),
        ]
        for c in energy["configs"]
    ]
    figure = _line_figure(energy["lines"], data.axes.x, "energy ratio", go, reference=1.0)
    return f"""<h2>Energy: telemetry over the workload's own figure</h2>
<p class=hint>Per config: GPU telemetry's energy over the measured window (the study's
<code>measure:</code>) divided by {_E(workload)}; 1 is agreement. Mean over cycles with
the 95% confidence interval (Student t).</p>
<div class=grid><div>{_figure_html(figure)}</div>
<div>{_table(headers, rows, set(range(len(params), len(headers))))}</div></div>
"""


def _page(data: ReportData, plotly_js: str, go: Any) -> str:
    summary = data.summary
    constants = describe(data.selection.constants)
    # No "<" at all inside the script element: "</script>" or "<!--" in a value
    # (an error message, a path) must not end or confuse it. JSON reads \u003c as "<".
    payload = json.dumps(data.as_json(), default=str).replace("<", "\\u003c")
    subplots = require_extra("plotly.subplots", "The HTML report")
    timeline = (
        _figure_html(_timeline_figure(data, go, subplots)) if data.bars else "<p>No runs yet.</p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_E(summary["study"])}: llem-dispatch report</title>
<style>{_CSS}</style>
<script type="text/javascript">{plotly_js}</script>
</head><body><main>
<h1>{_E(summary["study"])}</h1>
<p class=sub>{_E(summary["results_dir"])} · runner {_E(str(summary["runner"]))} ·
report generated {_E(summary["generated_at"])}</p>
{f"<p class=sub>constant parameters: {_E(constants)}</p>" if constants else ""}
{_cards(summary)}
<h2>GPU timeline</h2>
<p class=hint>Each bar is one attempt of an experiment on one GPU, from its start to its exit
(hover for its config and result). Pale green at a bar's start: from its gate (or start)
to its first measured work, where the experiment marked it. Grey after a bar: the cooldown
gap; hatched: an attempt that failed and was retried; blank: the GPU was idle. Below,
where the study sampled GPU telemetry: each GPU's power and temperature on the same time
axis.</p>
{timeline}
<h2>Results</h2>
{_results_section(data, go)}
{_energy_section(data, go)}
<h2>Failures ({len(data.failures)})</h2>
{_failures_table(data)}
<h2>All experiments ({len(data.rows)})</h2>
{_experiments_table(data)}
</main>
<script type="application/json" id="llem-report-data">{payload}</script>
</body></html>
"""


def render_report(results_dir: str | Path, spec: ReportSpec | None = None) -> str:
    """The report of a results dir as one self-contained HTML document.

    `spec` overrides the study's `report:` section (columns, x, group). Needs
    plotly (`pip install 'llem-dispatch[report]'`).
    """
    require_extra("plotly", "The HTML report")
    go = require_extra("plotly.graph_objects", "The HTML report")
    offline = require_extra("plotly.offline", "The HTML report")
    data = build_report_data(read_results(results_dir), spec)
    return _page(data, offline.get_plotlyjs(), go)


def write_report(
    results_dir: str | Path, output: str | Path | None = None, spec: ReportSpec | None = None
) -> Path:
    """Write the report (default: `<results_dir>/report.html`) and return its path."""
    target = Path(output) if output is not None else Path(results_dir) / "report.html"
    text = render_report(results_dir, spec)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target
