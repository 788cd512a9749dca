"""8. Slow-starting image: GPU idle time between experiments, with and without prestart.

A `function:` study on a python image whose module takes STARTUP_S to import
(as torch or vllm would) and then works WORK_S on its GPU; 2 virtual GPUs,
gpus=1 each, run once without and once with `prestart=True` (same runner
settings, same configs). The experiment stamps its own work window (wall clock,
shared with the host), so the GPU's idle time between two experiments is the
next one's work start minus the previous one's work end on that GPU, whatever
the container start-up and imports cost.

Target: median idle gap with prestart at most 0.2x the gap without it.
"""

from __future__ import annotations

import itertools
import time

from benchmarks._common import (
    LABELS,
    PYTHON_IMAGE,
    BenchmarkError,
    Context,
    fmt_ms,
    median,
    percentile,
    table,
)
from llem_dispatch import DockerRunner
from llem_dispatch.dispatch import Dispatcher, RunRecord
from llem_dispatch.gpu import GpuPool

NAME = "slow_start"
TITLE = "GPU idle between experiments of a slow-starting image, with and without prestart"
NEEDS_DOCKER = True

GPUS = 2
STARTUP_S = 2.0
WORK_S = 1.0
MODULE = f"""
import time
time.sleep({STARTUP_S})  # the image's imports (torch, vllm...): CPU only

def run(config):
    start = time.time()
    time.sleep({WORK_S})  # the GPU work
    return {{"i": config["i"], "work_start": start, "work_end": time.time()}}
"""


async def one_study(ctx: Context, count: int, *, prestart: bool) -> tuple[float, list[RunRecord]]:
    """Wall time of the whole study and its records."""
    source = ctx.scratch("src-")
    (source / "slow_start_work.py").write_text(MODULE)
    runner = DockerRunner(
        PYTHON_IMAGE,
        function="slow_start_work:run",
        source_dir=source,
        network="none",
        gpu_passthrough=False,
        labels=LABELS,
        exchange_base=ctx.scratch("exchange-"),
    )
    configs = [{"bench": NAME, "prestart": prestart, "i": i} for i in range(count)]
    records: list[RunRecord] = []
    async with Dispatcher(runner, pool=GpuPool.virtual_devices(GPUS), prestart=prestart) as d:
        started = time.perf_counter()
        async for record in d.map(configs, gpus=1):
            if not record.ok:
                raise BenchmarkError(f"experiment failed: {record.status} {record.error}")
            records.append(record)
        wall = time.perf_counter() - started
    return wall, records


def idle_gaps(records: list[RunRecord]) -> list[float]:
    """Per GPU, from one experiment's work end to the next one's work start."""
    windows: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        data = (record.result or {}).get("data", {})
        windows.setdefault(record.gpu_ids[0], []).append((data["work_start"], data["work_end"]))
    gaps: list[float] = []
    for spans in windows.values():
        spans.sort()
        gaps += [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(spans)]
    return gaps


async def run(ctx: Context) -> None:
    count = 4 if ctx.smoke else 12
    results = {flag: await one_study(ctx, count, prestart=flag) for flag in (False, True)}
    print(
        f"  {count} experiments per study, gpus=1 each, {GPUS} virtual GPUs, {PYTHON_IMAGE}; "
        f"each imports for {STARTUP_S:.0f} s, then works {WORK_S:.0f} s"
    )
    rows = []
    gaps: dict[bool, list[float]] = {}
    for flag, (wall, records) in results.items():
        gaps[flag] = idle_gaps(records)
        rows.append(
            [
                "prestart" if flag else "no prestart",
                f"{wall:.2f}",
                sum(r.prestarted for r in records),
                len(gaps[flag]),
                fmt_ms(median(gaps[flag])),
                fmt_ms(percentile(gaps[flag], 95)),
                fmt_ms(sum(gaps[flag])),
            ]
        )
    table(
        ["study", "wall s", "prestarted", "hand-offs", "idle median ms", "p95 ms", "idle sum ms"],
        rows,
    )
    ratio = median(gaps[True]) / median(gaps[False])
    print(f"  wall time with / without prestart = {results[True][0] / results[False][0]:.3f}")
    ctx.check("median GPU idle gap, prestart / no prestart", f"{ratio:.3f}", "<= 0.2", ratio <= 0.2)
