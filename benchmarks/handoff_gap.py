"""5. GPU hand-off gap: idle time of a GPU between one container's exit and the next's start.

Short no-op experiments on 2 virtual GPUs through the real daemon
(`DockerRunner(gpu_passthrough=False)`, gpus=1 each, `Dispatcher(pool=
GpuPool.virtual_devices(2))`): median and p95 of `RunRecord.handoff_gap_s`,
against the `docker run --rm` floor of benchmark 1, measured again in this run
(half before, half after the dispatcher's runs). The Engine API phases of a
bare container (create, start, wait, delete) are measured alongside to show
what the gap is made of.

Target: median gap at most half the floor.

Prestart variant: the same 2 GPUs, `function:` runs on a python image that work
WORK_S each (longer than a container start, the case prestart is for), with and
without `prestart=True`. With it, the next container is started while its GPU is
busy and held at its gate: the gap is exit -> gate. Target: median exit-to-gate
gap at most 0.05x the floor, measured in the same run (a guard: it was 0.02x, and a
gap counted from the `done` mark rather than the exit, or one timer or engine call
between the exit and the gate, is more). Command variant: the same with `command:`
runs on the busybox image (no python: its own command held behind the shell gate),
same target.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid

import aiodocker
import anyio

from benchmarks._common import (
    IMAGE,
    LABELS,
    NOOP_CMD,
    PYTHON_IMAGE,
    BenchmarkError,
    Context,
    cli_run_once,
    fmt_ms,
    median,
    percentile,
    table,
)
from benchmarks.dispatch_overhead import floor_once
from llem_dispatch import DockerRunner
from llem_dispatch.dispatch import Dispatcher, RunRecord
from llem_dispatch.gpu import GpuPool

NAME = "handoff_gap"
TITLE = "GPU hand-off gap (exit -> next start) on 2 virtual GPUs vs the `docker run --rm` floor"
NEEDS_DOCKER = True

NETWORK = "none"
GPUS = 2
RUN_LABEL = "llem.bench.run"
PARTS = (
    "exit -> next create",
    "create -> attach",
    "attach -> start",
    "exit -> next start (daemon)",
)
#: Seconds each prestart-variant experiment works (sleeps) after its gate.
WORK_S = 1.0
#: The prestart variants' target: median exit-to-gate gap / floor.
PRESTART_TARGET = 0.05
WORK_MODULE = f"""
import time

def run(config):
    time.sleep({WORK_S})
    return {{"i": config["i"]}}
"""


async def floor_samples(
    ctx: Context, n: int, offset: int
) -> tuple[list[float], list[dict[str, float]]]:
    cli_base = ctx.scratch("cli-")
    cli: list[float] = []
    phases: list[dict[str, float]] = []
    async with aiodocker.Docker() as docker:
        for i in range(n):
            cli.append(await cli_run_once(cli_base, network=NETWORK, index=offset + i))
            phases.append(await floor_once(docker, NETWORK))
    return cli, phases


async def container_events(token: str, since: float, until: float) -> dict[str, dict[str, float]]:
    """Daemon-side event times (create, attach, start, die, destroy) per container id."""
    argv = [
        "docker",
        "events",
        "--since",
        f"{since:.3f}",
        "--until",
        f"{until:.3f}",
        "--filter",
        "type=container",
        "--filter",
        f"label={RUN_LABEL}={token}",
        "--format",
        "{{json .}}",
    ]
    proc = await anyio.run_process(argv, check=False)
    events: dict[str, dict[str, float]] = {}
    for line in proc.stdout.decode().splitlines():
        event = json.loads(line)
        events.setdefault(event["id"], {}).setdefault(event["Action"], event["timeNano"] / 1e9)
    return events


def breakdown(
    records: list[RunRecord], events: dict[str, dict[str, float]]
) -> dict[str, list[float]]:
    """Split each hand-off (previous container's exit on a GPU -> next start) by daemon events."""
    parts: dict[str, list[float]] = {key: [] for key in PARTS}
    by_gpu: dict[str, list[RunRecord]] = {}
    for record in sorted(records, key=lambda r: r.started_at or r.queued_at):
        by_gpu.setdefault(record.gpu_ids[0], []).append(record)
    for runs in by_gpu.values():
        for prev, nxt in itertools.pairwise(runs):
            p = events.get(prev.container_id or "", {})
            n = events.get(nxt.container_id or "", {})
            if not {"die"} <= p.keys() or not {"create", "start"} <= n.keys():
                continue
            attach = n.get("attach", n["create"])
            parts["exit -> next create"].append(n["create"] - p["die"])
            parts["create -> attach"].append(attach - n["create"])
            parts["attach -> start"].append(n["start"] - attach)
            parts["exit -> next start (daemon)"].append(n["start"] - p["die"])
    return parts


#: The command variant's experiment: busybox's shell works WORK_S, then writes a result.
WORK_COMMAND = ["sh", "-c", f'sleep {WORK_S}; echo "{{}}" > "$LLEM_RESULT_PATH"']


async def function_gaps(
    ctx: Context, count: int, *, prestart: bool, command: bool = False
) -> list[float]:
    """Hand-off gaps of runs that work WORK_S each (exit -> gate with prestart):
    `function:` runs on the python image, or `command:` runs on busybox."""
    source = ctx.scratch("src-")
    (source / "handoff_work.py").write_text(WORK_MODULE)
    common: dict[str, object] = {
        "network": NETWORK,
        "gpu_passthrough": False,
        "labels": LABELS,
        "exchange_base": ctx.scratch("exchange-"),
    }
    if command:
        runner = DockerRunner(IMAGE, command=WORK_COMMAND, **common)  # type: ignore[arg-type]
    else:
        runner = DockerRunner(
            PYTHON_IMAGE,
            function="handoff_work:run",
            source_dir=source,
            **common,  # type: ignore[arg-type]
        )
    pool = GpuPool.virtual_devices(GPUS)
    configs = [{"bench": NAME, "prestart": prestart, "cmd": command, "i": i} for i in range(count)]
    gaps: list[float] = []
    async with Dispatcher(runner, pool=pool, prestart=prestart) as dispatcher:
        async for record in dispatcher.map(configs, gpus=1):
            if not record.ok:
                raise BenchmarkError(f"experiment failed: {record.status} {record.error}")
            if record.handoff_gap_s is not None and record.prestarted == prestart:
                gaps.append(record.handoff_gap_s)
    return gaps


def report_prestart(
    ctx: Context, warm: dict[bool, list[float]], floor: float, *, command: bool = False
) -> None:
    """The prestart variant's table and verdict, against the floor of this run."""
    what = f"command runs on {IMAGE}" if command else f"function runs on {PYTHON_IMAGE}"
    print(
        f"  prestart variant: {what} working {WORK_S:.1f} s each, "
        f"{GPUS} virtual GPUs; gap = exit -> next start (without) / exit -> gate (with)"
    )
    table(
        ["variant", "n", "median ms", "p95 ms", "min ms", "max ms", "median / floor"],
        [
            [
                "prestart" if flag else "no prestart",
                len(gaps),
                fmt_ms(median(gaps)),
                fmt_ms(percentile(gaps, 95)),
                fmt_ms(min(gaps, default=math.nan)),
                fmt_ms(max(gaps, default=math.nan)),
                f"{median(gaps) / floor:.3f}",
            ]
            for flag, gaps in warm.items()
        ],
    )
    gap = median(warm[True])
    ctx.check(
        f"median exit-to-gate gap (prestart, {'command' if command else 'function'}) "
        "/ docker run floor",
        f"{gap / floor:.3f}",
        f"<= {PRESTART_TARGET}",
        gap <= PRESTART_TARGET * floor,
    )


async def run(ctx: Context) -> None:
    count = 8 if ctx.smoke else 32
    floor_n = 2 if ctx.smoke else 6  # per side (before and after)
    await floor_samples(ctx, 1, -1)  # warm-up
    cli, phases = await floor_samples(ctx, floor_n, 0)
    token = uuid.uuid4().hex[:12]
    runner = DockerRunner(
        IMAGE,
        command=NOOP_CMD,
        network=NETWORK,
        gpu_passthrough=False,
        labels={**LABELS, RUN_LABEL: token},
        exchange_base=ctx.scratch("exchange-"),
    )
    configs = [{"bench": NAME, "i": i} for i in range(count)]
    records: list[RunRecord] = []
    since = time.time() - 1
    async with Dispatcher(runner, pool=GpuPool.virtual_devices(GPUS)) as dispatcher:
        async for record in dispatcher.map(configs, gpus=1):
            if not record.ok:
                raise BenchmarkError(f"experiment failed: {record.status} {record.error}")
            records.append(record)
    parts = breakdown(records, await container_events(token, since, time.time() + 1))
    warm = {flag: await function_gaps(ctx, count // 2, prestart=flag) for flag in (False, True)}
    warm_cmd = {
        flag: await function_gaps(ctx, count // 2, prestart=flag, command=True)
        for flag in (False, True)
    }
    cli_after, phases_after = await floor_samples(ctx, floor_n, floor_n)
    cli += cli_after
    phases += phases_after

    gaps = [r.handoff_gap_s for r in records if r.handoff_gap_s is not None]
    durations = [r.duration_s for r in records if r.duration_s is not None]
    floor = median(cli)
    phase = {key: median([p[key] for p in phases]) for key in phases[0]}
    print(
        f"  {count} no-op experiments, gpus=1 each, {GPUS} virtual GPUs, network={NETWORK}; "
        f"floor: {len(cli)} x `docker run --rm` (half before, half after)"
    )
    table(
        ["measure", "n", "median ms", "p95 ms", "min ms", "max ms"],
        [
            [
                "hand-off gap (ours)",
                len(gaps),
                fmt_ms(median(gaps)),
                fmt_ms(percentile(gaps, 95)),
                fmt_ms(min(gaps)),
                fmt_ms(max(gaps)),
            ],
            [
                "run start->end (ours)",
                len(durations),
                fmt_ms(median(durations)),
                fmt_ms(percentile(durations, 95)),
                fmt_ms(min(durations)),
                fmt_ms(max(durations)),
            ],
            [
                "docker run --rm floor",
                len(cli),
                fmt_ms(floor),
                fmt_ms(percentile(cli, 95)),
                fmt_ms(min(cli)),
                fmt_ms(max(cli)),
            ],
            *[
                [
                    f"API {key} (bare)",
                    len(phases),
                    fmt_ms(value),
                    fmt_ms(percentile([p[key] for p in phases], 95)),
                    fmt_ms(min(p[key] for p in phases)),
                    fmt_ms(max(p[key] for p in phases)),
                ]
                for key, value in phase.items()
            ],
            *[
                [
                    f"hand-off: {key}",
                    len(values),
                    fmt_ms(median(values)),
                    fmt_ms(percentile(values, 95)),
                    fmt_ms(min(values, default=math.nan)),
                    fmt_ms(max(values, default=math.nan)),
                ]
                for key, values in parts.items()
            ],
        ],
    )
    print(
        "  (hand-off rows: daemon event times; `exit -> next create` is the runner's wait "
        "returning, the GPU release, the next acquire, the exchange dir and the create call)"
    )
    gap = median(gaps)
    to_create = median(parts["exit -> next create"])
    to_start = median(parts["create -> attach"]) + median(parts["attach -> start"])
    print(
        f"  gap/floor = {gap / floor:.3f}; daemon-side hand-off: exit -> next create "
        f"{fmt_ms(to_create)} ms + create -> start {fmt_ms(to_start)} ms; "
        f"bare API start alone / floor = {phase['start'] / floor:.3f}"
    )
    ctx.check(
        "median hand-off gap / docker run floor", f"{gap / floor:.3f}", "<= 0.5", gap <= floor / 2
    )
    if gap > floor / 2:
        print(
            f"  MISS by {fmt_ms(gap - floor / 2)} ms ({gap / (floor / 2):.2f}x the allowed gap). "
            "The Dispatcher frees the GPU at container exit (observer), but creates the next "
            "container only after acquiring it, so every gap holds a whole create + attach + "
            f"start ({fmt_ms(to_start)} ms here) after {fmt_ms(to_create)} ms of release, "
            "acquire, exchange dir and create call. The daemon's start alone is "
            f"{phase['start'] / floor:.0%} of the floor: pre-creating would save only the "
            "create; meeting the target needs the next container started before the GPU frees "
            "(prestart, below)."
        )
    report_prestart(ctx, warm, floor)
    report_prestart(ctx, warm_cmd, floor, command=True)
