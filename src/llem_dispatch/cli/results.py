"""`llem-dispatch results`: one row per experiment, as a table to read, CSV, JSON lines or Parquet.

The table shows what a person scans (short key, status, GPUs, duration, the
parameters that vary, a few result fields, rounded); `--all` shows every column;
CSV, JSON lines and Parquet are complete and unrounded.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
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
    format_value,
    load_results,
    read_results,
    select_columns,
    short_keys,
    sort_records,
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
    outcome = ", ".join(f"{n} {status}" for status, n in counts.most_common())
    gpus = results.gpu_count
    where = f"runner {results.facts.get('runner', '?')}" + (
        f", {gpus} {'virtual ' if results.facts.get('virtual_gpus') else ''}GPUs" if gpus else ""
    )
    console.print(
        f"[bold]{results.name}[/]: {len(results.records)} experiments ({outcome}); {where}"
    )
    if selection.constants:
        same = "  ".join(f"{k}={format_value(v)}" for k, v in selection.constants.items())
        console.print(f"[dim]same in every experiment:[/] {same}", markup=True)
    if selection.unknown:
        console.print(
            f"[yellow]report columns not found in any result: {', '.join(selection.unknown)}[/]"
        )


def _people_table(results: StudyResults, rows: list[dict[str, Any]], selection: Selection) -> Table:
    shorts = short_keys(results.records)
    failures = any(row["error"] for row in rows)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    table.add_column("key", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("GPU", no_wrap=True, overflow="ellipsis")
    table.add_column("duration", justify="right", no_wrap=True)
    for name in selection.params:
        numeric = all(_is_number(row.get(f"param.{name}")) for row in rows)
        table.add_column(
            name,
            justify="right" if numeric else "left",
            no_wrap=True,
            overflow="ellipsis",
            max_width=24,
        )
    for name in selection.results:
        table.add_column(name, justify="right", no_wrap=True)
    if failures:
        table.add_column("error", no_wrap=True, overflow="ellipsis")
    for row in rows:
        status = str(row["status"])
        gpus = (f"{row['node']}:" if row.get("node") else "") + str(row["gpu_ids"] or "-")
        cells = [
            Text(shorts.get(str(row["key"]), str(row["key"]))),
            Text(status, style=_STATUS_STYLE.get(status, "")),
            Text(gpus),
            Text(format_duration(row["duration_s"])),
            *(Text(format_value(row.get(f"param.{p}"))) for p in selection.params),
            *(Text(format_value(row.get(f"result.{c}"))) for c in selection.results),
        ]
        if failures:
            cells.append(Text(str(row["error"] or ""), style="red"))
        table.add_row(*cells)
    return table


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
) -> None:
    """One row per experiment: params, status, duration, GPU ids, key result fields."""
    if fmt not in FORMATS:
        raise fail_usage(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    data = open_results(results_dir)
    records = sort_records(data.records, data.param_order())
    rows = [flat_row(r) for r in records]
    if fmt == "parquet":
        if output is None:
            raise fail_usage("Parquet is binary: give the file to write", "Add -o results.parquet.")
        try:
            write_parquet(load_results(results_dir), output)
        except ImportError as exc:
            raise fail_usage(str(exc)) from exc
        make_console(stderr=True).print(f"wrote {len(rows)} rows to {output}")
        return
    if fmt in {"csv", "jsonl"}:
        _write_text(fmt, rows, output)
        return
    if output is not None:
        raise fail_usage("-o/--output writes csv, jsonl or parquet", "Add --format csv.")
    console = make_console()
    selection = select_columns(data, rows, report_spec(data, columns))
    if show_all:
        table = _full_table(rows, _columns(rows))
        # Everything, one line per experiment: wider than the terminal on purpose
        # (pipe to `less -S`); CSV is the way to analyse it.
        wide = console.options.update_width(100_000)
        console.width = max(console.width, console.measure(table, options=wide).maximum)
    else:
        table = _people_table(data, rows, selection)
    _header(data, selection, console)
    console.print(table)
