"""Reading a results dir for people: the results table's columns, pandas, the HTML report.

Between `study` (which writes results dirs) and `cli` (which shows them).
Optional packages are imported only by the functions that need them: plotly (the
`report` extra) by the HTML report, pandas and pyarrow (the `data` extra) by
`load_results`, `load_stats` and Parquet; `analysis` brings both extras.
"""

from llem_dispatch.report.data import (
    EXTRA_OF,
    StudyResults,
    failure_info,
    flat_row,
    format_duration,
    format_param,
    format_value,
    read_results,
    require_extra,
    short_keys,
    sort_records,
    window_disturbed,
)
from llem_dispatch.report.frame import load_results, load_stats, write_parquet
from llem_dispatch.report.html import render_report, write_report
from llem_dispatch.report.model import ReportData, build_report_data
from llem_dispatch.report.selection import PlotAxes, Selection, plot_axes, select_columns
from llem_dispatch.report.stats import numeric_fields, stats_rows
from llem_dispatch.report.timeline import Bar, Session, Timeline, build_timeline

__all__ = [
    "EXTRA_OF",
    "Bar",
    "PlotAxes",
    "ReportData",
    "Selection",
    "Session",
    "StudyResults",
    "Timeline",
    "build_report_data",
    "build_timeline",
    "failure_info",
    "flat_row",
    "format_duration",
    "format_param",
    "format_value",
    "load_results",
    "load_stats",
    "numeric_fields",
    "plot_axes",
    "read_results",
    "render_report",
    "require_extra",
    "select_columns",
    "short_keys",
    "sort_records",
    "stats_rows",
    "window_disturbed",
    "write_parquet",
    "write_report",
]
