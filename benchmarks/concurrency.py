"""2. Concurrency: no-op containers per second through the Dispatcher vs `xargs -P N docker run`.

For each concurrency N the same number of no-op containers run through
`Dispatcher(DockerRunner(...), max_concurrency=N)` (0 GPUs per job) and through
`xargs -P N docker run --rm ...` on the same image and network mode (`none`);
each variant's containers run in two rounds ordered ABBA (ours, xargs, xargs, ours;
swapped at the next N), so drift on a shared machine hits both alike. Target: ours/xargs >= 1.0
at every N. The daemon saturates where doubling N adds less than 10% throughput.
"""

from __future__ import annotations

import itertools
import math
import resource
import statistics
import time
from dataclasses import dataclass, field

import anyio

from benchmarks._common import (
    IMAGE,
    LABELS,
    NOOP_CMD,
    BenchmarkError,
    Context,
    busy_fraction,
    cli_argv,
    cpu_times,
    table,
)
from llem_dispatch import DockerRunner
from llem_dispatch.dispatch import Dispatcher

NAME = "concurrency"
TITLE = "containers/s at concurrency N: Dispatcher(DockerRunner) vs `xargs -P N docker run --rm`"
NEEDS_DOCKER = True

LEVELS = (1, 2, 4, 8)
SMOKE_LEVELS = (1, 4)
NETWORK = "none"
SATURATION_GAIN = 1.10
#: Full mode splits each variant's containers into this many rounds, ABBA-ordered.
ROUNDS = 2


@dataclass
class Tally:
    """Accumulated over a variant's rounds at one N."""

    seconds: float = 0.0
    containers: int = 0
    client_cpu_s: float = 0.0
    busy: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.containers / self.seconds if self.seconds else math.nan


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


async def ours(ctx: Context, count: int, concurrency: int, tag: str) -> tuple[float, float]:
    """(seconds, this process's CPU seconds) for `count` no-op experiments via the Dispatcher."""
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
        cpu = _cpu(resource.RUSAGE_SELF)
        start = time.perf_counter()
        async for record in dispatcher.map(configs, gpus=0):
            ok += record.ok
        elapsed = time.perf_counter() - start
        cpu = _cpu(resource.RUSAGE_SELF) - cpu
    if ok != count:
        raise BenchmarkError(f"ours at N={concurrency}: only {ok}/{count} succeeded")
    return elapsed, cpu


async def xargs(count: int, concurrency: int) -> tuple[float, float]:
    """(seconds, CPU seconds of xargs and its docker CLIs) for `count` `docker run --rm`."""
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
    cpu = _cpu(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = await anyio.run_process(argv, input=stdin, check=False)
    elapsed = time.perf_counter() - start
    cpu = _cpu(resource.RUSAGE_CHILDREN) - cpu
    if proc.returncode != 0:
        raise BenchmarkError(f"xargs docker run failed ({proc.returncode}): {proc.stderr[-500:]!r}")
    return elapsed, cpu


def saturation(levels: tuple[int, ...], rates: dict[int, float]) -> str:
    """The first N after which doubling (or the next level) adds less than 10%."""
    for low, high in itertools.pairwise(levels):
        if rates[high] < rates[low] * SATURATION_GAIN:
            return f"N={low} ({rates[low]:.2f}/s; N={high} gives {rates[high]:.2f}/s)"
    return f"not reached by N={levels[-1]}"


async def run(ctx: Context) -> None:
    count = 8 if ctx.smoke else 64
    rounds = 1 if ctx.smoke else ROUNDS
    levels = SMOKE_LEVELS if ctx.smoke else LEVELS
    per_round = count // rounds
    # Warm-up: the first create/start after idle is slower for both.
    await ours(ctx, 2, 2, "warm")
    await xargs(2, 2)
    tallies: dict[str, dict[int, Tally]] = {"ours": {}, "xargs": {}}
    rows = []
    for index, level in enumerate(levels):
        for per_level in tallies.values():
            per_level[level] = Tally()
        # ABBA: rounds alternate which variant goes first, so drift hits both alike.
        for r in range(rounds):
            order = ("ours", "xargs") if (index + r) % 2 == 0 else ("xargs", "ours")
            for variant in order:
                before = cpu_times()
                if variant == "ours":
                    elapsed, cpu = await ours(ctx, per_round, level, f"n{level}r{r}")
                else:
                    elapsed, cpu = await xargs(per_round, level)
                tally = tallies[variant][level]
                tally.seconds += elapsed
                tally.containers += per_round
                tally.client_cpu_s += cpu
                tally.busy.append(busy_fraction(before, cpu_times()))
        o, x = tallies["ours"][level], tallies["xargs"][level]
        rows.append(
            [
                level,
                f"{o.seconds:.2f}",
                f"{o.rate:.2f}",
                f"{x.seconds:.2f}",
                f"{x.rate:.2f}",
                f"{o.rate / x.rate:.3f}",
                f"{statistics.mean(o.busy):.0%}",
                f"{statistics.mean(x.busy):.0%}",
                f"{o.client_cpu_s / o.containers * 1000:.0f}",
                f"{x.client_cpu_s / x.containers * 1000:.0f}",
            ]
        )
    print(
        f"  {count} no-op containers per variant and N ({rounds} ABBA round(s) of {per_round}), "
        f"network={NETWORK}, image {IMAGE}"
    )
    table(
        [
            "N",
            "ours s",
            "ours /s",
            "xargs s",
            "xargs /s",
            "ours/xargs",
            "host CPU ours",
            "host CPU xargs",
            "client ms/ctr ours",
            "client ms/ctr xargs",
        ],
        rows,
    )
    print(
        "  (host CPU = busy share of all cores, daemon included; client ms/ctr = CPU time of "
        "this process, or of xargs + docker CLIs, per container)"
    )
    rates = {v: {n: t.rate for n, t in per_level.items()} for v, per_level in tallies.items()}
    print(f"  daemon saturates (ours):  {saturation(levels, rates['ours'])}")
    print(f"  daemon saturates (xargs): {saturation(levels, rates['xargs'])}")
    for level in levels:
        ratio = rates["ours"][level] / rates["xargs"][level]
        ctx.check(f"ours/xargs containers/s at N={level}", f"{ratio:.3f}", ">= 1.0", ratio >= 1.0)
