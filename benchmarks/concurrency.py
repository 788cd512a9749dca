"""2. Concurrency: no-op containers per second through the Dispatcher vs `xargs -P N docker run`.

For each concurrency N the same number of no-op containers run through
`Dispatcher(DockerRunner(...), max_concurrency=N)` (0 GPUs per job) and through
`xargs -P N docker run --rm ...` on the same image and network mode (`none`);
the two variants alternate which goes first at each N. Target: ours/xargs >= 1.0
at every N. The daemon saturates where doubling N adds less than 10% throughput.
"""

from __future__ import annotations

import time

import anyio

from benchmarks._common import (
    IMAGE,
    LABELS,
    NOOP_CMD,
    Context,
    busy_fraction,
    cli_argv,
    cpu_times,
    table,
)
from llem_dispatch import DockerRunner
from llem_dispatch.dispatcher import Dispatcher

NAME = "concurrency"
TITLE = "containers/s at concurrency N: Dispatcher(DockerRunner) vs `xargs -P N docker run --rm`"
NEEDS_DOCKER = True

LEVELS = (1, 2, 4, 8)
SMOKE_LEVELS = (1, 4)
NETWORK = "none"
SATURATION_GAIN = 1.10


async def ours(ctx: Context, count: int, concurrency: int, tag: str) -> tuple[float, int]:
    """Seconds for `count` no-op experiments through the Dispatcher, and how many succeeded."""
    runner = DockerRunner(
        IMAGE,
        command=NOOP_CMD,
        network=NETWORK,
        labels=LABELS,
        exchange_base=ctx.workdir,
    )
    configs = [{"bench": NAME, "tag": tag, "i": i} for i in range(count)]
    ok = 0
    async with Dispatcher(runner, max_concurrency=concurrency) as dispatcher:
        start = time.perf_counter()
        async for record in dispatcher.map(configs, gpus=0):
            ok += record.ok
        elapsed = time.perf_counter() - start
    return elapsed, ok


async def xargs(count: int, concurrency: int) -> tuple[float, int]:
    """Seconds for `count` no-op `docker run --rm` through `xargs -P N`, and how many succeeded."""
    argv = [
        "xargs",
        "-P",
        str(concurrency),
        "-I",
        "%",
        *cli_argv(
            NOOP_CMD,
            network=NETWORK,
            env={"LLEM_RESULT_PATH": "/tmp/result.json", "LLEM_BENCH_I": "%"},
        ),
    ]
    stdin = "".join(f"{i}\n" for i in range(count)).encode()
    start = time.perf_counter()
    proc = await anyio.run_process(argv, input=stdin, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"xargs docker run failed ({proc.returncode}): {proc.stderr[-500:]!r}")
    return elapsed, count


def saturation(levels: tuple[int, ...], rates: dict[int, float]) -> str:
    """The first N after which doubling (or the next level) adds less than 10%."""
    for low, high in zip(levels, levels[1:], strict=False):
        if rates[high] < rates[low] * SATURATION_GAIN:
            return f"N={low} ({rates[low]:.2f}/s; N={high} gives {rates[high]:.2f}/s)"
    return f"not reached by N={levels[-1]}"


async def run(ctx: Context) -> None:
    count = 8 if ctx.smoke else 64
    levels = SMOKE_LEVELS if ctx.smoke else LEVELS
    # Warm-up: the first create/start after idle is slower for both.
    await ours(ctx, 2, 2, "warm")
    await xargs(2, 2)
    rates: dict[str, dict[int, float]] = {"ours": {}, "xargs": {}}
    rows = []
    for index, level in enumerate(levels):
        results: dict[str, tuple[float, int]] = {}
        order = ("ours", "xargs") if index % 2 == 0 else ("xargs", "ours")
        busy: dict[str, float] = {}
        for variant in order:
            before = cpu_times()
            if variant == "ours":
                results[variant] = await ours(ctx, count, level, f"n{level}")
            else:
                results[variant] = await xargs(count, level)
            busy[variant] = busy_fraction(before, cpu_times())
        for variant, (elapsed, ok) in results.items():
            if ok != count:
                raise RuntimeError(f"{variant} at N={level}: only {ok}/{count} succeeded")
            rates[variant][level] = count / elapsed
        rows.append(
            [
                level,
                f"{results['ours'][0]:.2f}",
                f"{rates['ours'][level]:.2f}",
                f"{results['xargs'][0]:.2f}",
                f"{rates['xargs'][level]:.2f}",
                f"{rates['ours'][level] / rates['xargs'][level]:.3f}",
                f"{busy['ours']:.0%}",
                f"{busy['xargs']:.0%}",
            ]
        )
    print(f"  {count} no-op containers per run, network={NETWORK}, image {IMAGE}")
    table(
        ["N", "ours s", "ours /s", "xargs s", "xargs /s", "ours/xargs", "CPU ours", "CPU xargs"],
        rows,
    )
    print("  (CPU = busy share of all host cores during the run, daemon and clients included)")
    print(f"  daemon saturates (ours):  {saturation(levels, rates['ours'])}")
    print(f"  daemon saturates (xargs): {saturation(levels, rates['xargs'])}")
    for level in levels:
        ratio = rates["ours"][level] / rates["xargs"][level]
        ctx.check(f"ours/xargs containers/s at N={level}", f"{ratio:.3f}", ">= 1.0", ratio >= 1.0)
