"""`llem-dispatch report`: a results dir as one self-contained HTML file to open anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llem_dispatch.cli.app import app, fail_usage, make_console
from llem_dispatch.cli.results import open_results, report_spec
from llem_dispatch.report import build_report_data, format_duration, write_report

__all__ = ["report"]


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="A results dir written by `run`.")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="HTML file to write (default: DIR/report.html)."),
    ] = None,
    x: Annotated[
        str | None, typer.Option(help="Parameter on the plots' x axis (default: report.x).")
    ] = None,
    group: Annotated[
        str | None, typer.Option(help="Parameter with one line per value (default: report.group).")
    ] = None,
    columns: Annotated[
        str | None, typer.Option(help="Result fields to plot, 'a,b' (default: report.columns).")
    ] = None,
) -> None:
    """Summary, per-GPU timeline, result plots and failures, in one HTML file (no network)."""
    results = open_results(results_dir)
    spec = report_spec(results, columns, x=x, group=group)
    if spec.x is not None and spec.x == spec.group:
        raise fail_usage(f"--x and --group are both {spec.x!r}", "Pick two parameters.")
    try:
        path = write_report(results_dir, output, spec)
    except ImportError as exc:
        raise fail_usage(str(exc)) from exc
    except OSError as exc:
        raise fail_usage(f"cannot write {output}: {exc.strerror}") from exc
    summary = build_report_data(results, spec).summary
    counts = summary["counts"]
    util = summary["utilisation"]
    console = make_console()
    console.print(
        f"{summary['study']}: {summary['recorded']} experiments, {counts['succeeded']} "
        f"succeeded, {counts['failed'] + counts['error'] + counts['cancelled']} failed, "
        f"wall {format_duration(summary['wall_s'])}"
        + (f", GPU occupancy {util:.0%}" if util is not None else "")
        + (f", SM utilisation {summary['sm_util']:.0%}" if summary.get("sm_util") else "")
        + (
            f", {summary['windows_disturbed']} of {summary['windows_checked']} measured "
            "windows disturbed by a neighbour's preparation"
            if summary["windows_checked"]
            else ""
        ),
        soft_wrap=True,
    )
    size_mb = path.stat().st_size / 1e6
    console.print(
        f"report: {path} ({size_mb:.1f} MB) -> {path.resolve().as_uri()}",
        soft_wrap=True,
    )
