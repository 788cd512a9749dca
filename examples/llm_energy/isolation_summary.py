"""The isolation comparison's table, from isolation.sh's results dirs.

    python examples/llm_energy/isolation_summary.py OUT [--cooldown 2]

OUT holds one results dir per variant and round (`off-r1`, `pause-r1`, `run-r1`, ...).
Per variant and batch size: J/token and tokens/s over every cycle of every round
(mean, cv, n), then per variant the GPU's idle time beyond the cooldown between
consecutive experiments (the next one's first measured work minus the previous
one's last, less the cooldown: median, mean, max) and the neighbour-seconds of
preparation inside measured windows, from the records.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def _records(folder: Path) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text()) for p in (folder / "records").glob("*.json")]
    ok = [r for r in found if r.get("status") == "succeeded"]
    return sorted(ok, key=lambda r: r["result"]["data"]["start_wall"])


def _cv(values: list[float]) -> float:
    if len(values) < 2 or statistics.mean(values) == 0:
        return 0.0
    return statistics.stdev(values) / statistics.mean(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cooldown", type=float, default=2.0)
    args = parser.parse_args(argv)
    metrics: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    gaps: dict[str, list[float]] = defaultdict(list)
    overlap: dict[str, list[float]] = defaultdict(list)
    walls: dict[str, list[float]] = defaultdict(list)
    for folder in sorted(p for p in args.out.iterdir() if (p / "records").is_dir()):
        variant = folder.name.rsplit("-r", 1)[0]
        records = _records(folder)
        for record in records:
            data = record["result"]["data"]
            key = (variant, int(data["batch_size"]))
            metrics[key]["j_per_token"].append(float(data["j_per_token"]))
            metrics[key]["tokens_per_s"].append(float(data["tokens_per_s"]))
            overlap[variant].append(float(record.get("window_prepare_overlap_s") or 0.0))
        for prev, nxt in itertools.pairwise(records):
            idle = nxt["result"]["data"]["start_wall"] - prev["result"]["data"]["end_wall"]
            gaps[variant].append(idle - args.cooldown)
        if records:
            walls[variant].append(
                records[-1]["result"]["data"]["end_wall"]
                - records[0]["result"]["data"]["start_wall"]
            )
    print("| variant | batch | n | J/token mean | cv | tokens/s mean | cv |")
    print("|---|---|---|---|---|---|---|")
    for (variant, batch), values in sorted(metrics.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        j, tps = values["j_per_token"], values["tokens_per_s"]
        print(
            f"| {variant} | {batch} | {len(j)} | {statistics.mean(j):.4f} | {_cv(j):.3f} | "
            f"{statistics.mean(tps):.1f} | {_cv(tps):.3f} |"
        )
    print()
    for batch in sorted({b for _, b in metrics}):
        off = metrics.get(("off", batch))
        for variant in ("pause", "run"):
            mine = metrics.get((variant, batch))
            if off and mine:
                ratio_j = statistics.mean(mine["j_per_token"]) / statistics.mean(off["j_per_token"])
                ratio_t = statistics.mean(mine["tokens_per_s"]) / statistics.mean(
                    off["tokens_per_s"]
                )
                print(f"batch {batch}: {variant}/off J/token {ratio_j:.3f}, tokens/s {ratio_t:.3f}")
    print()
    print(
        "| variant | gaps | idle beyond cooldown: median s | mean s | max s | "
        "prep in windows, neighbour-s (sum) | first work to last, s (per round) |"
    )
    print("|---|---|---|---|---|---|---|")
    for variant in sorted(gaps):
        g = gaps[variant]
        print(
            f"| {variant} | {len(g)} | {statistics.median(g):.2f} | {statistics.mean(g):.2f} | "
            f"{max(g):.2f} | {sum(overlap[variant]):.2f} | "
            f"{', '.join(f'{w:.1f}' for w in walls[variant])} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
