"""`llem-dispatch results`: one row per experiment, as a table, CSV or JSON lines."""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from llem_dispatch.cli.app import (
    app,
    fail_usage,
    make_console,
)
from llem_dispatch.dispatch import (
    NodeInfo,
)
from llem_dispatch.study import (
    iter_records,
)

__all__ = ["record_row", "results"]


def record_row(data: dict[str, Any]) -> dict[str, Any]:
    """One flat row per record: params, status, timing, GPUs, scalar result fields."""
    row: dict[str, Any] = {
        "key": data.get("key"),
        "config_hash": data.get("config_hash"),
        "cycle": data.get("cycle"),
        "status": data.get("status"),
    }
    for k, v in sorted((data.get("config") or {}).items()):
        row[f"param.{k}"] = json.dumps(v) if isinstance(v, dict | list) else v
    started, ended = data.get("started_at"), data.get("ended_at")
    duration = None
    if started and ended:
        duration = (datetime.fromisoformat(ended) - datetime.fromisoformat(started)).total_seconds()
    row["duration_s"] = round(duration, 3) if duration is not None else None
    if node := data.get("node"):
        # Cluster runs: GPU ids are per node, so the node goes beside them.
        row["node"] = NodeInfo.model_validate(node).label
    row["gpu_ids"] = ",".join(data.get("gpu_ids") or [])
    row["image_digest"] = data.get("image_digest")
    row["attempts"] = data.get("attempts")
    result = data.get("result") or {}
    payload = result.get("data", result) if isinstance(result, dict) else {}
    for k, v in sorted(payload.items()):
        if isinstance(v, str | int | float | bool) or v is None:
            row[f"result.{k}"] = v
    error = data.get("error") or data.get("failure") or {}
    row["error"] = error.get("type") if isinstance(error, dict) else None
    row["exchange_dir"] = data.get("exchange_dir")
    return row


@app.command()
def results(
    results_dir: Annotated[Path, typer.Argument(help="A results dir written by `run`.")],
    fmt: Annotated[str, typer.Option("--format", help="table | csv | jsonl")] = "table",
) -> None:
    """One row per experiment: params, status, duration, GPU ids, key result fields."""
    if fmt not in {"table", "csv", "jsonl"}:
        raise fail_usage(f"--format {fmt!r} is not one of table, csv, jsonl")
    if not (results_dir / "records").is_dir():
        raise fail_usage(
            f"{results_dir} holds no records/ folder",
            "Point at a dir written by `llem-dispatch run`.",
        )
    rows = [record_row(r) for r in iter_records(results_dir)]
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    out = sys.stdout
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, default=str) + "\n")
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
        out.write(buffer.getvalue())
    else:
        table = Table(title=f"{results_dir}: {len(rows)} experiments")
        shown = [c for c in columns if c not in {"config_hash", "exchange_dir", "image_digest"}]
        for column in shown:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in shown))
        make_console().print(table)
