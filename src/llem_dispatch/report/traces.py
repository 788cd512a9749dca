"""GPU telemetry traces for the report: power, temperature and SM utilisation per GPU.

Read from the study's `telemetry.csv.gz` with the standard library (no pandas),
thinned to a few thousand points per GPU by averaging neighbours, so a day of
0.1 s samples still makes a report that opens quickly.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from llem_dispatch.study.telemetry import TELEMETRY_FILE

__all__ = ["FIELDS", "TELEMETRY_FILE", "Trace", "mean_sm_util", "read_traces"]

#: The figures a trace keeps, as the CSV names them.
FIELDS = ("power_w", "temperature_c", "sm_util_pct")


@dataclass
class Trace:
    """One GPU's samples in time order: epoch seconds and each figure (None: not read)."""

    gpu: str
    t: list[float] = field(default_factory=list)
    power_w: list[float | None] = field(default_factory=list)
    temperature_c: list[float | None] = field(default_factory=list)
    sm_util_pct: list[float | None] = field(default_factory=list)

    def values(self, name: str) -> list[float | None]:
        """The column `name` (one of FIELDS)."""
        column: list[float | None] = getattr(self, name)
        return column


def _number(text: str | None) -> float | None:
    if not text:
        return None
    with contextlib.suppress(ValueError):
        value = float(text)
        return value if math.isfinite(value) else None
    return None


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _thin(trace: Trace, max_points: int) -> Trace:
    """Average runs of consecutive samples down to at most `max_points`."""
    n = len(trace.t)
    if n <= max_points:
        return trace
    step = math.ceil(n / max_points)
    out = Trace(trace.gpu)
    for start in range(0, n, step):
        out.t.append(sum(trace.t[start : start + step]) / len(trace.t[start : start + step]))
        for name in FIELDS:
            out.values(name).append(_mean(trace.values(name)[start : start + step]))
    return out


def read_traces(results_dir: str | Path, *, max_points: int = 3000) -> dict[str, Trace]:
    """Every GPU's trace from the results dir's telemetry file ({} when there is none).

    A file cut short by a crash (a torn last gzip member) gives what it holds.
    """
    path = Path(results_dir) / TELEMETRY_FILE
    traces: dict[str, Trace] = {}
    if not path.exists():
        return traces
    rows: list[dict[str, str]] = []
    with contextlib.suppress(OSError, EOFError, zlib.error), gzip.open(path, "rt") as text:
        rows.extend(csv.DictReader(text))
    for row in sorted(rows, key=lambda r: _number(r.get("t")) or 0.0):
        t = _number(row.get("t"))
        if t is None or not row.get("gpu"):
            continue
        trace = traces.setdefault(row["gpu"], Trace(row["gpu"]))
        trace.t.append(t)
        for name in FIELDS:
            trace.values(name).append(_number(row.get(name)))
    return {gpu: _thin(trace, max_points) for gpu, trace in sorted(traces.items())}


def mean_sm_util(traces: dict[str, Trace]) -> float | None:
    """The mean sampled SM utilisation over every GPU and sample, as a share (0-1)."""
    values = [v for trace in traces.values() for v in trace.sm_util_pct if v is not None]
    return sum(values) / len(values) / 100.0 if values else None
