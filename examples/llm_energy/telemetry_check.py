"""The telemetry check's table: the workload's own energy against the dispatcher's.

    python examples/llm_energy/telemetry_check.py RESULTS_DIR [...]   # markdown table
    python examples/llm_energy/telemetry_check.py --nvml-cost          # NVML read costs

For every record with a `telemetry.window` block: the window's length, the workload's
own NVML figure, ours from the telemetry over the same window, their ratio, and
whether the window is short (< 2 s). Then the sampler's CPU cost from summary.json.
`--nvml-cost` times the sampler's reads on this host's GPUs (CPU ms per read).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _rows(results: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((results / "records").glob("*.json")):
        record = json.loads(path.read_text())
        window = (record.get("telemetry") or {}).get("window")
        if not window or "energy_j" not in window:
            continue
        rows.append({"config": record["config"], "cycle": record.get("cycle"), **window})
    return sorted(rows, key=lambda r: (json.dumps(r["config"], sort_keys=True), r["cycle"]))


def table(results: Path) -> None:
    """Print the comparison as a markdown table, then the within-3% count and the cost."""
    rows = _rows(results)
    print(f"\n{results.name}\n")
    print("| config | cycle | window s | workload J | telemetry J | ratio | short |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        config = ", ".join(f"{k}={v}" for k, v in sorted(r["config"].items()) if k != "gpus")
        ratio = r["ratio"]
        print(
            f"| {config} | {r['cycle']} | {r['duration_s']:.2f} | {r['reported_j']:.1f} | "
            f"{r['energy_j']:.1f} | {ratio:.4f} | {'yes' if r['short'] else ''} |"
        )
    long = [r for r in rows if not r["short"] and r["ratio"] is not None]
    if long:
        worst = max(abs(r["ratio"] - 1) for r in long)
        inside = sum(abs(r["ratio"] - 1) <= 0.03 for r in long)
        print(f"\nwindows >= 2 s: {inside} of {len(long)} within 3%; worst {100 * worst:.2f}%")
    short = [r for r in rows if r["short"] and r["ratio"] is not None]
    if short:
        worst = max(abs(r["ratio"] - 1) for r in short)
        print(f"windows < 2 s (flagged): {len(short)}; worst {100 * worst:.2f}%")
    summary = json.loads((results / "summary.json").read_text())
    print(f"sampler: {json.dumps(summary.get('telemetry'))}")


def nvml_cost(reads: int = 300) -> None:
    """CPU per read of the sampler's NVML calls, batched and one by one."""
    import pynvml

    from llem_dispatch.gpu.telemetry import NvmlTelemetry

    pynvml.nvmlInit()
    devices = [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    reader = NvmlTelemetry(devices)
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    cases = {
        "fast read (energy+power, 1 batched call)/GPU": lambda: reader.read(detail=False),
        "detail read (+temp, util, memory, clock)/GPU": lambda: reader.read(detail=True),
        "nvmlDeviceGetTotalEnergyConsumption": lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(
            handle
        ),
        "nvmlDeviceGetPowerUsage": lambda: pynvml.nvmlDeviceGetPowerUsage(handle),
    }
    for name, call in cases.items():
        call()
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(reads):
            call()
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        per = len(devices) if name.endswith("/GPU") else 1
        print(
            f"{name}: {1000 * cpu / reads / per:.3f} ms CPU, "
            f"{1000 * wall / reads / per:.3f} ms wall per call ({len(devices)} GPU(s))"
        )


if __name__ == "__main__":
    if sys.argv[1:] == ["--nvml-cost"]:
        nvml_cost()
    else:
        for arg in sys.argv[1:]:
            table(Path(arg))
