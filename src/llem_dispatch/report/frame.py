"""A results dir as a pandas DataFrame, and as a Parquet file (the `data` extra).

One row per experiment with the columns of `llem-dispatch results --format csv`,
typed: timestamps as UTC datetimes, `gpu_ids` and result lists as lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from llem_dispatch.report.data import flat_row, read_results, require_extra, sort_records
from llem_dispatch.report.stats import stats_rows

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TIMESTAMPS", "load_results", "load_stats", "write_parquet"]

TIMESTAMPS = ("queued_at", "started_at", "exited_at", "ended_at")


def load_results(results_dir: str | Path, *, stats: bool = False) -> pd.DataFrame:
    """One row per experiment of a results dir: flattened config and result, typed.

    With `stats=True`, one row per config instead: `load_stats`.

    Columns: `key`, `config_hash`, `cycle`, `status`, `param.<name>` for every
    config field, `duration_s`, the timestamps (`queued_at`, `started_at`,
    `exited_at`, `ended_at`, UTC), `gpu_ids` (a list of ids), `node` (clusters),
    `attempts`, `result.<name>` for every result field (nested dicts dotted),
    `energy.*` (GPU telemetry), `cpus`, `isolation`, the window's overlaps and
    `window_disturbed` (see `flat_row`),
    `error` (the error class), `error_message`, `fix`, `exchange_dir`. Rows are
    ordered by parameters, then cycle. `df.attrs["study"]` is the study as run.
    Needs pandas (`pip install 'llem-dispatch[data]'`).
    """
    if stats:
        return load_stats(results_dir)
    pandas = require_extra("pandas", "load_results")
    results = read_results(results_dir)
    rows = [flat_row(r, lists=True) for r in sort_records(results.records, results.param_order())]
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    frame = pandas.DataFrame.from_records(rows, columns=list(columns) or None)
    for stamp in TIMESTAMPS:
        if stamp in frame.columns:
            frame[stamp] = pandas.to_datetime(frame[stamp], utc=True, format="ISO8601")
    frame.attrs["study"] = results.study
    frame.attrs["results_dir"] = str(results.path)
    return frame


def load_stats(results_dir: str | Path, *, exclude_disturbed: bool = False) -> pd.DataFrame:
    """One row per config across its cycles: `n`, and `<field>_mean`, `<field>_std`
    (sample, ddof=1) and `<field>_ci95` (Student-t 95% half-width) for every numeric
    field (`duration_s`, `result.*`, `energy.*`), as `results --stats` writes them.

    Only succeeded cycles count (with `exclude_disturbed`, only those whose measured
    window no neighbour's preparation overlapped); `runs` counts every record. Needs pandas
    (the `data` extra).
    """
    pandas = require_extra("pandas", "load_stats")
    results = read_results(results_dir)
    rows = stats_rows(results.records, results.param_order(), exclude_disturbed=exclude_disturbed)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    frame = pandas.DataFrame.from_records(rows, columns=list(columns) or None)
    frame.attrs["study"] = results.study
    frame.attrs["results_dir"] = str(results.path)
    return frame


def _single_type(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet needs one type per column: a mixed one (1 here, "n/a" there) becomes JSON."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype != object:
            continue
        kinds = {type(v) for v in out[column] if v is not None and v == v}  # noqa: PLR0124
        if len(kinds) > 1:
            out[column] = [
                None if v is None else json.dumps(v, default=str) for v in out[column].tolist()
            ]
    return out


def write_parquet(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write `load_results`' frame as Parquet (needs pyarrow, in the `data` extra)."""
    require_extra("pyarrow", "Parquet output")
    target = Path(path)
    _single_type(frame).to_parquet(target, index=False)
    return target
