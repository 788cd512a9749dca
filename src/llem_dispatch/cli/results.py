"""`llem-dispatch results`: one row per experiment, as a table to read, CSV, JSON lines or Parquet.

The table shows what a person scans (short key, status, GPUs, duration, whether a
neighbour's preparation disturbed the measured window, the parameters that vary, a
few result fields, rounded); `--all` shows every column; CSV, JSON lines and Parquet
are complete and unrounded. `--exclude-disturbed` leaves disturbed windows out.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llem_dispatch.cli.app import app, fail_usage, make_console
from llem_dispatch.errors import ConfigError
from llem_dispatch.report import (
    Selection,
    StudyResults,
    flat_row,
    format_duration,
    format_param,
    format_value,
    load_results,
    load_stats,
    read_results,
    select_columns,
    short_keys,
    sort_records,
    stats_rows,
    window_disturbed,
    write_parquet,
)
from llem_dispatch.study import ReportSpec

__all__ = ["open_results", "record_row", "report_spec", "results"]

FORMATS = ("table", "csv", "jsonl", "parquet")
_STATUS_STYLE = {"succeeded": "green", "failed": "red", "error": "red", "cancelled": "yellow"}


def record_row(data: dict[str, Any]) -> dict[str, Any]:
    """One flat row per record, as CSV and JSON lines write it (see `report.flat_row`)."""
    return flat_row(data)


def open_results(results_dir: Path) -> StudyResults:
    """Read a results dir, or exit 2 saying why it is not one."""
    try:
        return read_results(results_dir)
    except ConfigError as exc:
        raise fail_usage(exc.message, exc.fix_suggestion) from exc


def report_spec(results: StudyResults, columns: str | None, **axes: str | None) -> ReportSpec:
    """The study's `report:` section with the command line's choices on top, checked."""
    spec = results.report
    update: dict[str, Any] = {k: v for k, v in axes.items() if v is not None}
    if columns is not None:
        update["columns"] = [c.strip() for c in columns.split(",") if c.strip()]
    params = [*results.param_order(), "cycle"]
    for name, value in axes.items():
        if value is not None and value not in params:
            raise fail_usage(
                f"--{name} {value!r} is not a parameter of {results.name}",
                f"Use one of: {', '.join(params)}.",
            )
    return spec.model_copy(update=update)


def _header(results: StudyResults, selection: Selection, console: Console) -> None:
    counts = Counter(str(r.get("status")) for r in results.records)
    outcome = ", ".join(f"{n} {status}" for status, n in counts.most_common()) or "none yet"
    gpus = results.gpu_count
    where = f"runner {results.facts.get('runner', '?')}" + (
        f", {gpus} {'virtual ' if results.facts.get('virtual_gpus') else ''}GPUs" if gpus else ""
    )
    console.print(
        Text.assemble(
            (results.name, "bold"), f": {len(results.records)} experiments ({outcome}); {where}"
        )
    )
    if selection.constants:
        same = "  ".join(f"{k}={format_param(v)}" for k, v in selection.constants.items())
        console.print(Text.assemble(("same in every experiment:", "dim"), f" {same}"))
    if selection.unknown:
        console.print(
            Text(
                f"report columns not found in any result: {', '.join(selection.unknown)}",
                style="yellow",
            )
        )


@dataclass
class _Column:
    """One column of the people's table: its cells, and whether it may be cut to fit."""

    header: str
    cells: list[Text]
    right: bool = False
    flexible: bool = False
    result: bool = False
    cap: int | None = None

    @property
    def natural(self) -> int:
        """Width of the widest cell or the header."""
        return max([cell_len(self.header), *(c.cell_len for c in self.cells)])


def _fit(columns: list[_Column], width: int) -> list[str]:
    """Make the table fit `width`; return the headers of columns left out.

    First the text columns are cut (widest first, down to 6 characters), then
    result columns are left out from the last (one always stays), then duration
    and GPU. Keys, statuses and numbers are never cut: a cut number misleads.
    """
    widths = {id(c): c.natural for c in columns}

    def total() -> int:
        return sum(widths[id(c)] for c in columns) + 3 * len(columns) - 1

    while total() > width:
        flexible = [c for c in columns if c.flexible and widths[id(c)] > 6]
        if not flexible:
            break
        widest = max(flexible, key=lambda c: widths[id(c)])
        widths[id(widest)] -= 1
        widest.cap = widths[id(widest)]
    dropped: list[str] = []
    droppable = [c for c in columns if c.result][1:][::-1]
    droppable += [c for c in columns if c.header in {"duration", "GPU", "to work"} and not c.result]
    while total() > width and droppable:
        column = droppable.pop(0)
        columns.remove(column)
        dropped.append(column.header)
    return dropped


def _status_cell(row: dict[str, Any]) -> Text:
    # A failure shows its class (DockerOOMError, MemoryError...): what a person acts on.
    status = str(row["status"])
    return Text(str(row["error"] or status), style=_STATUS_STYLE.get(status, ""))


def _people_table(
    results: StudyResults, rows: list[dict[str, Any]], selection: Selection, width: int
) -> Table:
    shorts = short_keys(results.records)
    keys = [shorts.get(str(r["key"]), str(r["key"])) for r in rows]
    gpus = [(f"{r['node']}:" if r.get("node") else "") + str(r["gpu_ids"] or "-") for r in rows]
    columns = [
        _Column("key", [Text(k) for k in keys]),
        _Column("status", [_status_cell(r) for r in rows]),
        _Column("GPU", [Text(g) for g in gpus], flexible=True),
        _Column("duration", [Text(format_duration(r["duration_s"])) for r in rows], right=True),
    ]
    if any(r.get("window_disturbed") is not None for r in rows):
        # Whether a neighbour's unpaused preparation ran inside the measured window.
        cells = [_window_cell(r.get("window_disturbed")) for r in rows]
        columns.append(_Column("window", cells))
    if any(r.get("gate_to_work_s") is not None for r in rows):
        # The GPU idle inside each run: from its gate (or start) to its first measured work.
        cells = [Text(format_duration(r.get("gate_to_work_s"))) for r in rows]
        columns.append(_Column("to work", cells, right=True))
    for name in selection.params:
        values = [r.get(f"param.{name}") for r in rows]
        numeric = all(_is_number(v) for v in values)
        cells = [Text(format_param(v)) for v in values]
        columns.append(_Column(name, cells, right=numeric, flexible=not numeric))
    for name in selection.results:
        cells = [Text(format_value(r.get(f"result.{name}"))) for r in rows]
        columns.append(_Column(name, cells, right=True, result=True))
    dropped = _fit(columns, width)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(
            column.header,
            justify="right" if column.right else "left",
            no_wrap=True,
            overflow="ellipsis",
            max_width=column.cap,
        )
    for index in range(len(rows)):
        table.add_row(*(column.cells[index] for column in columns))
    if dropped:
        table.caption = f"not shown for lack of width: {', '.join(dropped)} (see --all, or widen)"
    return table


def _window_cell(disturbed: bool | None) -> Text:
    if disturbed is None:
        return Text("")
    return Text("disturbed", style="red") if disturbed else Text("clean", style="dim")


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _full_table(rows: list[dict[str, Any]], columns: list[str]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*(Text(format_value(row.get(c))) for c in columns))
    return table


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return list(names)


def _write_text(fmt: str, rows: list[dict[str, Any]], output: Path | None) -> None:
    buffer = io.StringIO()
    if fmt == "jsonl":
        for row in rows:
            buffer.write(json.dumps(row, default=str) + "\n")
    else:
        writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    if output is None:
        sys.stdout.write(buffer.getvalue())
    else:
        output.write_text(buffer.getvalue())


def _stats(
    data: StudyResults, fmt: str, output: Path | None, columns: str | None, exclude: bool
) -> None:
    """`--stats`: one row per config, written as `fmt`."""
    rows = stats_rows(data.records, data.param_order(), exclude_disturbed=exclude)
    succeeded = [r for r in data.records if r.get("status") == "succeeded"]
    _say_left_out(succeeded, exclude, fmt)
    frame = functools.partial(load_stats, data.path, exclude_disturbed=exclude)
    if _written(fmt, rows, output, frame, "stats.parquet"):
        return
    console = make_console()
    flat = [flat_row(r) for r in data.records]
    selection = select_columns(data, flat, report_spec(data, columns))
    shown = selection.results or [c.removeprefix("result.") for c in _result_fields(rows)]
    # Telemetry's window energy over the workload's own figure, where both were measured.
    shown += ["energy.ratio"] if any(r.get("energy.ratio_mean") is not None for r in rows) else []
    disturbed = any("disturbed" in r for r in rows)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    table.add_column("config", no_wrap=True, min_width=7)
    for name in selection.params:
        table.add_column(name, no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True, min_width=2)
    if disturbed:
        table.add_column("disturbed", justify="right", no_wrap=True)
    for name in shown:
        table.add_column(f"{name} (mean ± ci95)", justify="right", no_wrap=True)
    for row in rows:
        cells = [Text(str(row["config_hash"])[:7])]
        cells += [Text(format_param(row.get(f"param.{p}"))) for p in selection.params]
        cells.append(Text(str(row["n"])))
        if disturbed:
            count = row.get("disturbed") or 0
            cells.append(Text(str(count), style="red" if count and not exclude else ""))
        for name in shown:
            column = name if name.startswith("energy.") else f"result.{name}"
            mean, ci = row.get(f"{column}_mean"), row.get(f"{column}_ci95")
            text = format_value(mean) + (f" ± {format_value(ci)}" if ci is not None else "")
            cells.append(Text(text))
        table.add_row(*cells)
    console.print(Text.assemble((data.name, "bold"), f": {len(rows)} configs, across cycles"))
    console.print(table)


def _say_left_out(records: Sequence[Mapping[str, Any]], exclude: bool, fmt: str) -> None:
    """With `--exclude-disturbed`: how many records it left out (stderr beside a file format)."""
    if not exclude:
        return
    flags = [window_disturbed(r) for r in records]
    known = [f for f in flags if f is not None]
    if not known:
        note = (
            "--exclude-disturbed: no record says whether its measured window was disturbed "
            "(results from before the window checks); none left out"
        )
    else:
        left = sum(known)
        note = (
            f"left out {left} of {len(known)} measured windows: disturbed by a "
            "neighbour's unpaused preparation"
        )
    make_console(stderr=fmt != "table").print(Text(note, style="yellow"))


def _result_fields(rows: list[dict[str, Any]]) -> list[str]:
    """The result fields that have statistics, in column order (a few, for the table)."""
    names = [c.removesuffix("_mean") for c in _columns(rows) if c.endswith("_mean")]
    return [n for n in names if n.startswith("result.")][:4]


@app.command()
def results(
    results_dir: Annotated[Path, typer.Argument(help="A results dir written by `run`.")],
    fmt: Annotated[str, typer.Option("--format", help="table | csv | jsonl | parquet")] = "table",
    show_all: Annotated[
        bool, typer.Option("--all", help="Table: every column, full keys (wide).")
    ] = False,
    columns: Annotated[
        str | None,
        typer.Option(help="Table: result fields to show, 'a,b' (default: the study's report:)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (parquet needs it).")
    ] = None,
    stats: Annotated[
        bool,
        typer.Option(
            "--stats",
            help="One row per config across its cycles: n, and <field>_mean, _std, _ci95 "
            "(Student-t 95% half-width) of every numeric field.",
        ),
    ] = False,
    exclude_disturbed: Annotated[
        bool,
        typer.Option(
            "--exclude-disturbed",
            help="Leave out runs whose measured window overlapped a neighbour's unpaused "
            "preparation (the record's window_disturbed), saying how many.",
        ),
    ] = False,
) -> None:
    """One row per experiment: params, status, duration, GPU ids, key result fields."""
    if fmt not in FORMATS:
        raise fail_usage(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    data = open_results(results_dir)
    if stats:
        _stats(data, fmt, output, columns, exclude_disturbed)
        return
    records = sort_records(data.records, data.param_order())
    _say_left_out(records, exclude_disturbed, fmt)
    if exclude_disturbed:
        records = [r for r in records if window_disturbed(r) is not True]
    rows = [flat_row(r) for r in records]
    frame = functools.partial(_results_frame, results_dir, exclude_disturbed)
    if _written(fmt, rows, output, frame, "results.parquet"):
        return
    console = make_console()
    selection = select_columns(data, rows, report_spec(data, columns))
    if show_all:
        table = _full_table(rows, _columns(rows))
        # Everything, one line per experiment: wider than the terminal on purpose
        # (pipe to `less -S`); CSV is the way to analyse it.
        wide = console.options.update_width(100_000)
        console.width = max(console.width, console.measure(table, options=wide).maximum)
    else:
        table = _people_table(data, rows, selection, console.width)
    _header(data, selection, console)
    console.print(table)


def _results_frame(results_dir: Path, exclude_disturbed: bool) -> Any:
    """`load_results`, less the disturbed windows when asked (as the rows written)."""
    frame = load_results(results_dir)
    if exclude_disturbed and "window_disturbed" in frame.columns:
        frame = frame[frame["window_disturbed"].map(lambda d: d is not True)]
    return frame


def _written(
    fmt: str,
    rows: list[dict[str, Any]],
    output: Path | None,
    frame: Callable[[], Any],
    parquet_name: str,
) -> bool:
    """Write `rows` as csv/jsonl (or `frame()` as Parquet) when asked; False for a table."""
    if fmt == "parquet":
        if output is None:
            raise fail_usage("Parquet is binary: give the file to write", f"Add -o {parquet_name}.")
        try:
            write_parquet(frame(), output)
        except ImportError as exc:
            raise fail_usage(str(exc)) from exc
        make_console(stderr=True).print(f"wrote {len(rows)} rows to {output}")
        return True
    if fmt in {"csv", "jsonl"}:
        _write_text(fmt, rows, output)
        return True
    if output is not None:
        raise fail_usage("-o/--output writes csv, jsonl or parquet", "Add --format csv.")
    return False
