"""Real multi-GPU sweep with the LocalRunner: every GPU busy, never shared, checked.

    python examples/gpu_sweep/sweep.py [--experiments 8] [--seconds 3] [--out DIR]

Detects GPUs through NVML, runs `--experiments` 1-GPU experiments (concurrency =
number of GPUs) and, with two or more GPUs, one experiment that takes all of them.
Then checks from the records: each experiment saw exactly the GPU(s) it was
assigned (UUID match), no GPU was held by two experiments at once, and with two
or more GPUs they ran in parallel. Prints the records table with energy; exits 1
if a check fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import anyio

from llem_dispatch import LocalRunner
from llem_dispatch.dispatch import Dispatcher, RunRecord
from llem_dispatch.gpu import GpuPool

HERE = Path(__file__).resolve().parent


def check(records: list[RunRecord], pool: GpuPool) -> list[str]:
    problems: list[str] = []
    spans: dict[str, list[tuple[float, float, str]]] = {}
    for r in records:
        if not r.ok or r.result is None:
            problems.append(f"{r.config_hash}: {r.status} {r.error or r.failure}")
            continue
        data = r.result["data"]
        expected = sorted(pool.uuids.get(g, g) for g in r.gpu_ids)
        seen = sorted(data["visible_uuids"])
        if seen != expected:
            problems.append(f"{r.config_hash}: assigned {r.gpu_ids} = {expected}, saw {seen}")
        for g in r.gpu_ids:
            spans.setdefault(g, []).append((data["start_wall"], data["end_wall"], r.config_hash))
    for gpu, items in spans.items():
        items.sort()
        for (_s1, e1, h1), (s2, _, h2) in itertools.pairwise(items):
            if s2 < e1:
                problems.append(f"GPU {gpu} shared by {h1} and {h2}")
    if pool.size >= 2:
        singles = [r for r in records if r.ok and len(r.gpu_ids) == 1 and r.result]
        overlap = any(
            a.gpu_ids != b.gpu_ids
            and a.result["data"]["start_wall"] < b.result["data"]["end_wall"]  # type: ignore[index]
            and b.result["data"]["start_wall"] < a.result["data"]["end_wall"]  # type: ignore[index]
            for a in singles
            for b in singles
        )
        if not overlap:
            problems.append("no two experiments ran in parallel on different GPUs")
    return problems


async def main(args: argparse.Namespace) -> int:
    pool = GpuPool.detect()
    print(f"GpuPool.detect(): devices={list(pool.devices)} virtual={pool.virtual}")
    for gpu in pool.devices:
        print(f"  GPU {gpu}: {pool.uuids.get(gpu, '?')}")
    if not pool.devices:
        print("no GPUs found: nothing to check", file=sys.stderr)
        return 1
    runner = LocalRunner(function="experiment:run", cwd=HERE, timeout=600)
    records: list[RunRecord] = []
    async with Dispatcher(runner, pool=pool) as dispatcher:
        configs = [{"i": i, "n": args.n, "seconds": args.seconds} for i in range(args.experiments)]
        records += [r async for r in dispatcher.map(configs, gpus=1)]
        if pool.size >= 2:
            records.append(
                await dispatcher.run(
                    {"i": "all", "n": args.n, "seconds": args.seconds}, gpus=pool.size
                )
            )
        else:
            print("one GPU only: the all-GPU experiment is skipped")
    t0 = min((r.result["data"]["start_wall"] for r in records if r.result), default=0.0)
    print(
        f"{'config':16} {'gpus':5} {'uuid seen':42} {'start':>6} {'end':>6} "
        f"{'TFLOP/s':>8} {'energy J':>9}"
    )
    rows: list[dict[str, Any]] = []
    for r in sorted(records, key=lambda r: r.result["data"]["start_wall"] if r.result else 0):
        d = r.result["data"] if r.result else {}
        energy = sum(v for v in (d.get("energy_j") or {}).values() if v is not None)
        print(
            f"{r.config_hash:16} {','.join(r.gpu_ids):5} "
            f"{','.join(d.get('visible_uuids', []))[:42]:42} "
            f"{d.get('start_wall', t0) - t0:6.2f} {d.get('end_wall', t0) - t0:6.2f} "
            f"{d.get('tflops', 0):8.1f} {energy:9.1f}"
        )
        rows.append(
            {
                "config_hash": r.config_hash,
                "gpu_ids": r.gpu_ids,
                "status": r.status,
                **d,
                "handoff_gap_s": r.handoff_gap_s,
            }
        )
    problems = check(records, pool)
    for p in problems:
        print("CHECK FAILED:", p)
    print("checks:", "all passed" if not problems else f"{len(problems)} failed")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "records.json").write_text(json.dumps(rows, indent=2, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--out", default=None)
    sys.exit(anyio.run(main, parser.parse_args()))
