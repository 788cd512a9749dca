"""6. Log flood: dispatcher memory and wall time while a container prints hundreds of MB.

A no-op experiment that first prints N bytes (`yes ... | head -c N`) runs through
`DockerRunner.run`; a thread samples this process's VmRSS every 50 ms, and the
growth is the peak minus the value just before the run. Compared, in the same
run, with the same container sending its output to /dev/null (the floor), and
with `docker run --rm` streaming the same flood through the CLI to /dev/null
(what the daemon's log path costs without us). The sampler also hard-links the
runner's log file as soon as it appears, so its final size (after the runner has
removed the exchange dir of the successful run) shows how much output really came
through: a low RSS only counts if nothing was dropped.

The log file is capped (`DEFAULT_MAX_LOG_BYTES`, 32 MB: the first and last 16 MB,
with a marker that says how many characters were left out between them), so a
200 MB flood keeps 32 MB. The sanity checks compare with what the cap should
give: the log holds exactly min(output, cap), and what it kept plus what its
marker says it left out is every byte printed (nothing dropped on the way).

Target: RSS growth < 20 MB (and, as sanity checks, the log as the cap says and
all output seen).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from benchmarks._common import (
    IMAGE,
    LABELS,
    NOOP_SCRIPT,
    BenchmarkError,
    Context,
    RssSampler,
    cli_argv,
    status_kb,
    table,
)
from llem_dispatch import DockerRunner, ExperimentFailure, RunInfo
from llem_dispatch._logcapture import DEFAULT_MAX_LOG_BYTES
from llem_dispatch.runners.docker import LOG_DRAIN_S

NAME = "log_flood"
TITLE = "dispatcher RSS growth and wall time while a container prints 200 MB (vs /dev/null)"
NEEDS_DOCKER = True

NETWORK = "none"
LINE = "llem log flood 0123456789abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TARGET_MB = 20.0
MB = 1024 * 1024
#: The cut `LogCapture` writes between the kept head and tail of a capped log.
CUT_MARKER = re.compile(rb"\n\[\.\.\. (\d+) characters of output omitted \.\.\.\]\n")


def flood_script(size: int, *, sink: str | None) -> str:
    redirect = f" > {sink}" if sink else ""
    return f"yes '{LINE}' | head -c {size}{redirect}; {NOOP_SCRIPT}"


class LogLink:
    """Hard-links the runner's log file when it appears; the link outlives the exchange dir."""

    def __init__(self, base: Path, link: Path) -> None:
        self.base = base
        self.link = link

    def poll(self) -> int:
        if not self.link.exists():
            for log_file in self.base.glob("llem-*/container.log"):
                with contextlib.suppress(OSError):
                    os.link(log_file, self.link)
                    break
        return self.size()

    def size(self) -> int:
        try:
            return self.link.stat().st_size
        except OSError:
            return 0

    def kept(self) -> tuple[int, int]:
        """(bytes of output the log holds, bytes its cut marker says were left out).

        The marker sits right after the kept head (the output is ASCII: a character
        is a byte); a log under the cap has none.
        """
        size = self.size()
        if size == 0:
            return 0, 0
        with self.link.open("rb") as handle:
            handle.seek(DEFAULT_MAX_LOG_BYTES // 2)
            match = CUT_MARKER.match(handle.read(200))
        if match is None:
            return size, 0
        return size - len(match.group(0)), int(match.group(1))


class ExitClock:
    """A RunObserver noting when the container started and exited."""

    def __init__(self) -> None:
        self.started = math.nan
        self.exited = math.nan

    def on_started(self, info: RunInfo) -> None:
        self.started = time.perf_counter()

    def on_exited(self, info: RunInfo) -> None:
        self.exited = time.perf_counter()


@dataclass(frozen=True, slots=True)
class FloodRun:
    wall_s: float
    container_s: float
    growth_mb: float
    #: Output bytes the log file kept, and those plus what its cut marker says it left out.
    kept: int
    seen: int


async def through_runner(ctx: Context, size: int, *, sink: str | None, index: int) -> FloodRun:
    """One run: wall time, container start->exit, RSS growth, log MB the runner captured."""
    base = ctx.scratch("exchange-")
    link = LogLink(base, ctx.scratch("link-") / "container.log")
    runner = DockerRunner(
        IMAGE,
        command=["sh", "-c", flood_script(size, sink=sink)],
        network=NETWORK,
        labels=LABELS,
        exchange_base=base,
    )
    async with runner:
        await runner.image_digest()  # not part of the measured run
        gc.collect()
        before = status_kb("VmRSS")
        with RssSampler(0.05, extra=link.poll) as sampler:
            start = time.perf_counter()
            clock = ExitClock()
            outcome = await runner.run(
                {"bench": NAME, "size": size, "sink": sink, "i": index}, observer=clock
            )
            wall = time.perf_counter() - start
    if isinstance(outcome, ExperimentFailure):
        raise BenchmarkError(f"flood experiment failed: {outcome.message}")
    growth = (max(sampler.peak_kb, status_kb("VmRSS")) - before) / 1024
    kept, omitted = link.kept()
    return FloodRun(wall, clock.exited - clock.started, growth, kept, kept + omitted)


async def through_cli(size: int) -> float:
    argv = cli_argv(
        ["sh", "-c", flood_script(size, sink=None)],
        network=NETWORK,
        env={"LLEM_RESULT_PATH": "/tmp/result.json"},
    )
    start = time.perf_counter()
    proc = await anyio.run_process(argv, stdout=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchmarkError(f"docker run failed ({proc.returncode})")
    return wall


async def run(ctx: Context) -> None:
    size = (20 if ctx.smoke else 200) * MB
    await through_runner(ctx, 1024, sink=None, index=-1)  # warm-up: client, connections
    rows = []
    results: dict[str, FloodRun] = {}
    for label, sink in (
        ("runner, output to /dev/null", "/dev/null"),
        ("runner, output to logs", None),
    ):
        results[label] = await through_runner(ctx, size, sink=sink, index=len(results))
    cli_wall = await through_cli(size)
    for label, res in results.items():
        rows.append(
            [
                label,
                f"{res.wall_s:.2f}",
                f"{res.container_s:.2f}",
                f"{res.growth_mb:.1f}",
                f"{res.kept / MB:.1f}",
                f"{res.seen / MB:.1f}",
            ]
        )
    rows.append(
        ["docker run --rm > /dev/null (CLI)", f"{cli_wall:.2f}", "-", "-", "-", f"{size / MB:.1f}"]
    )
    print(
        f"  {size // MB} MB of output (`yes | head -c`), network={NETWORK}, RSS sampled every 50 ms"
    )
    table(
        ["variant", "wall s", "container ran s", "RSS growth MB", "log kept MB", "output seen MB"],
        rows,
    )
    flood = results["runner, output to logs"]
    flood_wall, flood_growth = flood.wall_s, flood.growth_mb
    quiet_wall = results["runner, output to /dev/null"].wall_s
    print(
        f"  wall flood/devnull = {flood_wall / quiet_wall:.2f}; "
        f"flood through runner / through CLI = {flood_wall / cli_wall:.2f}; "
        f"saw {flood.seen / size:.1%} of the output at {flood.seen / MB / flood_wall:.1f} MB/s"
    )
    ctx.check(
        "RSS growth MB (flood)",
        f"{flood_growth:.1f}",
        f"< {TARGET_MB:.0f}",
        flood_growth < TARGET_MB,
    )
    # What the cap should give: all of it under the cap, the cap's worth over it.
    expected = min(size, DEFAULT_MAX_LOG_BYTES)
    ctx.check(
        "output captured / printed (sanity)",
        f"{flood.kept / size:.3f}",
        f"== {expected / size:.3f}: min(output, the {DEFAULT_MAX_LOG_BYTES // MB} MB log cap)",
        flood.kept == expected,
    )
    ctx.check(
        "output kept + marked omitted / printed (sanity)",
        f"{flood.seen / size:.3f}",
        "== 1.000",
        flood.seen == size,
    )
    if flood.seen < size:
        print(
            f"  {(size - flood.seen) / MB:.1f} MB of output were dropped: the container exited "
            f"after {flood.container_s:.1f} s, the runner drains the log streams for at most "
            f"LOG_DRAIN_S ({LOG_DRAIN_S:.0f} s) after exit and then cancels them, and it reads "
            "the logs slower than the daemon stores them."
        )
