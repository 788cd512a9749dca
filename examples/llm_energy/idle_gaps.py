"""The GPU's idle time between experiments, from a results dir's records.

    python examples/llm_energy/idle_gaps.py RESULTS_DIR [--cooldown 2]

Per GPU, in start order: idle = the next experiment's first measured work (its
result's `start_wall`) minus the previous one's last (`end_wall`); beyond the
cooldown = idle - cooldown. Also each record's prepare, gate wait, gate-to-work
and hand-off gap, and the sweep's wall time (first start to last exit). With the
study's GPU telemetry (telemetry.csv.gz), also the seconds of each gap in which NVML
saw the SMs idle (`sm_util_pct` 0, 0.1 s samples): the warm-up and the weights' copy
keep the GPU busy though nothing is measured yet.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any


def _t(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def _sm_samples(results: Path) -> list[tuple[float, float]]:
    path = results / "telemetry.csv.gz"
    if not path.exists():
        return []
    with gzip.open(path, "rt") as handle:
        return [
            (float(row["t"]), float(row["sm_util_pct"]))
            for row in csv.DictReader(handle)
            if row.get("sm_util_pct") not in (None, "")
        ]


def _sm_idle_s(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    inside = [u for t, u in samples if start <= t < end]
    if not inside:
        return None
    return (end - start) * sum(1 for u in inside if u == 0) / len(inside)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--cooldown", type=float, default=2.0)
    args = parser.parse_args(argv)
    records = [json.loads(p.read_text()) for p in sorted((args.results / "records").glob("*.json"))]
    records = [r for r in records if r.get("status") == "succeeded"]
    records.sort(key=lambda r: _t(r.get("started_at")) or 0.0)
    print(
        "| # | model | batch | prepare s | gate wait s | hand-off gap s | gate to work s "
        "| idle s | beyond cooldown s | SMs idle s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    samples = _sm_samples(args.results)
    sm_idle: list[float] = []
    beyond: list[float] = []
    previous: dict[str, Any] | None = None
    for i, record in enumerate(records, 1):
        data = record["result"]["data"]
        idle = extra = quiet = None
        if previous is not None:
            idle = data["start_wall"] - previous["result"]["data"]["end_wall"]
            extra = idle - args.cooldown
            beyond.append(extra)
            quiet = _sm_idle_s(samples, previous["result"]["data"]["end_wall"], data["start_wall"])
            if quiet is not None:
                sm_idle.append(quiet)

        def f(v: float | None) -> str:
            return "" if v is None else f"{v:.2f}"

        print(
            f"| {i} | {data['model']} | {data['batch_size']} | {f(record.get('prepare_s'))} | "
            f"{f(record.get('gate_wait_s'))} | {f(record.get('handoff_gap_s'))} | "
            f"{f(record.get('gate_to_work_s'))} | {f(idle)} | {f(extra)} | {f(quiet)} |"
        )
        previous = record
    starts = [_t(r.get("started_at")) for r in records]
    ends = [_t(r.get("exited_at")) for r in records]
    wall = max(e for e in ends if e) - min(s for s in starts if s)
    if beyond:
        med, mean = statistics.median(beyond), statistics.mean(beyond)
        print(
            f"\nidle beyond the {args.cooldown:g} s cooldown: median {med:.2f} s, "
            f"mean {mean:.2f} s, max {max(beyond):.2f} s over {len(beyond)} gaps; "
            f"sweep wall time {wall:.1f} s ({len(records)} experiments)"
        )
    if sm_idle:
        print(
            f"SMs idle in the gaps (NVML): median {statistics.median(sm_idle):.2f} s, "
            f"beyond the cooldown {statistics.median(sm_idle) - args.cooldown:.2f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
