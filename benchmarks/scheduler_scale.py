"""3. Scheduler scale: 1k and 10k no-work experiments through the Dispatcher on 8 virtual GPUs.

`FakeRunner` does no work, so the time is the scheduler's own overhead: GPU
pool, concurrency limit, records, events. Each (size, variant) runs in a fresh
subprocess so its peak RSS (VmHWM) is its own. Variants:

- map: `dispatcher.map(configs, gpus=1)` (records consumed as they come);
- run: one `dispatcher.run(config, gpus=1)` task per config, all at once, records kept;
- bare: `FakeRunner.run` awaited in a loop with no dispatcher (the floor: config
  hashing and result models), so the dispatcher's own share can be told apart;
- map_yield / run_yield: as map / run, but the handler yields once to the event
  loop (`await anyio.lowlevel.checkpoint()`), so experiments really queue for GPUs as they
  would with any real runner. run_yield is only measured at 1k and 2k (200/400
  in smoke): it grows quadratically (every queued request wakes on every GPU
  release), 10k would take minutes.

Targets: < 200 us per experiment and < 150 MB peak RSS at 10k; the 10k/1k time
ratio is reported against linear (10).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import anyio
import anyio.lowlevel

from benchmarks._common import (
    REPO_ROOT,
    BenchmarkError,
    Context,
    quiet_logs,
    status_kb,
    table,
)

NAME = "scheduler_scale"
TITLE = "per-experiment overhead and peak RSS at 1k/10k experiments, FakeRunner, 8 virtual GPUs"
NEEDS_DOCKER = False

VARIANTS = ("map", "run", "bare", "map_yield", "run_yield")
#: Variants too slow for the large size: measured at the small size and twice it.
SMALL_ONLY = ("run_yield",)
GPUS = 8
REPEATS = 3
TARGET_US = 200.0
TARGET_MB = 150.0


def make_configs(n: int) -> list[dict[str, Any]]:
    models = ("llama-3-8b", "mistral-7b", "qwen2-7b", "phi-3-mini")
    return [
        {
            "model": models[i % len(models)],
            "batch_size": 2 ** (i % 7),
            "precision": ("fp16", "bf16", "int8")[i % 3],
            "backend": "vllm",
            "i": i,
        }
        for i in range(n)
    ]


async def _workload(variant: str, configs: list[dict[str, Any]]) -> tuple[float, int]:
    """One pass; returns (seconds, experiments that succeeded)."""
    from llem_dispatch.dispatch import Dispatcher, RunRecord
    from llem_dispatch.gpu import GpuPool
    from llem_dispatch.testing import FakeRunner

    async def yielding(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        await anyio.lowlevel.checkpoint()
        return {"ok": True}

    runner = FakeRunner(yielding if variant.endswith("_yield") else None)
    ok = 0
    if variant == "bare":
        start = time.perf_counter()
        for config in configs:
            await runner.run(config, gpus=("0",))
            ok += 1
        return time.perf_counter() - start, ok
    async with Dispatcher(runner, pool=GpuPool.virtual_devices(GPUS)) as dispatcher:
        start = time.perf_counter()
        if variant.startswith("map"):
            async for record in dispatcher.map(configs, gpus=1):
                ok += record.ok
        else:
            records: list[RunRecord] = []

            async def one(config: dict[str, Any]) -> None:
                records.append(await dispatcher.run(config, gpus=1))

            async with anyio.create_task_group() as tg:
                for config in configs:
                    tg.start_soon(one, config)
            ok = sum(r.ok for r in records)
        return time.perf_counter() - start, ok


def child(variant: str, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """Runs in the fresh subprocess: per size (ascending), time `repeats` passes, peak RSS.

    VmHWM only grows, so with several sizes in one child (smoke mode) each size's
    peak is its own only because the sizes run smallest first.
    """
    quiet_logs()
    # Count the library's imports in the baseline.
    import llem_dispatch.dispatch
    import llem_dispatch.testing  # noqa: F401

    baseline_kb = status_kb("VmHWM")
    out = []
    for n in sorted(sizes):
        configs = make_configs(n)
        times = []
        for _ in range(repeats):
            elapsed, ok = anyio.run(_workload, variant, configs)
            if ok != n:
                raise BenchmarkError(f"{variant}: only {ok}/{n} experiments succeeded")
            times.append(elapsed)
        out.append(
            {
                "variant": variant,
                "n": n,
                "times": times,
                "baseline_kb": baseline_kb,
                "peak_kb": status_kb("VmHWM"),
            }
        )
        del configs
    return out


async def spawn(variant: str, sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [
        sys.executable,
        "-m",
        "benchmarks.scheduler_scale",
        variant,
        ",".join(map(str, sizes)),
        str(repeats),
    ]
    proc = await anyio.run_process(argv, cwd=REPO_ROOT, env=env, check=False)
    if proc.returncode != 0:
        raise BenchmarkError(f"child {variant} n={sizes} failed: {proc.stderr.decode()[-2000:]}")
    result: list[dict[str, Any]] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


async def run(ctx: Context) -> None:
    sizes = (200, 2000) if ctx.smoke else (1000, 10000)
    repeats = 1 if ctx.smoke else REPEATS
    results: dict[tuple[str, int], dict[str, Any]] = {}
    # Full: one fresh child per (variant, size), one at a time, so every peak RSS is
    # its own. Smoke (figures only indicative): one child per variant, sizes ascending.
    jobs: list[tuple[str, list[int], int]] = []
    for variant in VARIANTS:
        variant_sizes = [sizes[0], 2 * sizes[0]] if variant in SMALL_ONLY else list(sizes)
        reps = 1 if variant in SMALL_ONLY else repeats
        if ctx.smoke:
            jobs.append((variant, variant_sizes, reps))
        else:
            jobs += [(variant, [n], reps) for n in variant_sizes]
    for variant, job_sizes, reps in jobs:
        for res in await spawn(variant, job_sizes, reps):
            results[(variant, res["n"])] = res
    rows = []
    us: dict[tuple[str, int], float] = {}
    for (variant, n), res in results.items():
        best = statistics.median(res["times"])
        us[(variant, n)] = best / n * 1e6
        rows.append(
            [
                variant,
                n,
                f"{best:.3f}",
                f"{us[(variant, n)]:.1f}",
                f"{res['baseline_kb'] / 1024:.1f}",
                f"{res['peak_kb'] / 1024:.1f}",
                f"{(res['peak_kb'] - res['baseline_kb']) / 1024:.1f}",
            ]
        )
    print(
        f"  FakeRunner (no work), {GPUS} virtual GPUs, gpus=1 each; median of {repeats} "
        "pass(es) per fresh subprocess"
        + (" (smoke: one child per variant, sizes ascending)" if ctx.smoke else "")
    )
    table(
        ["variant", "n", "time s", "us/exp", "RSS at start MB", "peak RSS MB", "growth MB"],
        rows,
    )
    small, large = sizes
    for variant in VARIANTS:
        big = 2 * small if variant in SMALL_ONLY else large
        ratio = statistics.median(results[(variant, big)]["times"]) / statistics.median(
            results[(variant, small)]["times"]
        )
        print(
            f"  {variant}: n={big}/n={small} time ratio = {ratio:.2f} "
            f"(linear = {big / small:.0f}, quadratic = {(big / small) ** 2:.0f})"
        )
    for variant in ("map", "run", "map_yield"):
        print(
            f"  {variant}: dispatcher's own share at n={large} = "
            f"{us[(variant, large)] - us[('bare', large)]:.1f} us/exp "
            f"(total {us[(variant, large)]:.1f} - bare FakeRunner {us[('bare', large)]:.1f})"
        )
    for variant in ("map", "run", "map_yield"):
        value = us[(variant, large)]
        ctx.check(
            f"{variant}: us/experiment at n={large}",
            f"{value:.1f}",
            f"< {TARGET_US:.0f}",
            value < TARGET_US,
        )
        peak_mb = results[(variant, large)]["peak_kb"] / 1024
        ctx.check(
            f"{variant}: peak RSS MB at n={large}",
            f"{peak_mb:.1f}",
            f"< {TARGET_MB:.0f}",
            peak_mb < TARGET_MB,
        )


def _main() -> None:
    parser = argparse.ArgumentParser(description="one scheduler_scale measurement (a child)")
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("sizes", help="comma-separated experiment counts")
    parser.add_argument("repeats", type=int)
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    print(json.dumps(child(args.variant, sizes, args.repeats)))


if __name__ == "__main__":
    _main()
