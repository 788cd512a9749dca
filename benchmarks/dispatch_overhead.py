"""1. Dispatch overhead: DockerRunner.run of a no-op container vs the Engine floor and the CLI.

Per experiment, sequentially, interleaved per iteration (the order rotates):

- runner: `DockerRunner.run` (exchange dir, bind mount, log followers, inspect,
  result validation, removal);
- floor: create, start, wait, delete over the Engine API with aiodocker and
  nothing else (same image, command and network);
- cli: one blocking `docker run --rm` subprocess per experiment, exchange dir
  bind-mounted and the result read back, the way the predecessor tool did it.

Targets: runner/floor <= 1.10 and runner/cli < 1.0 (medians).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiodocker

from benchmarks._common import (
    IMAGE,
    LABELS,
    NOOP_CMD,
    BenchmarkError,
    Context,
    cli_run_once,
    fmt_ms,
    median,
    percentile,
    table,
)
from llem_dispatch import DockerRunner, ExperimentFailure

NAME = "dispatch_overhead"
TITLE = "per-experiment wall time: DockerRunner.run vs Engine API floor vs `docker run --rm`"
NEEDS_DOCKER = True

NETWORKS: dict[str, str | None] = {"none": "none", "bridge": None}
#: A variant whose p90 exceeds this multiple of its median was measured on a busy daemon.
NOISY_SPREAD = 1.5


def floor_spec(network: str | None) -> dict[str, Any]:
    """The bare create body: same image, command and network as the runner's, nothing else."""
    host_config: dict[str, Any] = {}
    if network is not None:
        host_config["NetworkMode"] = network
    return {
        "Image": IMAGE,
        "Cmd": NOOP_CMD,
        "Env": ["LLEM_RESULT_PATH=/tmp/result.json"],
        "Labels": dict(LABELS),
        "HostConfig": host_config,
    }


async def floor_once(docker: aiodocker.Docker, network: str | None) -> dict[str, float]:
    """create, start, wait, delete; returns each phase's seconds and the total."""
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    container = await docker.containers.create(floor_spec(network))
    t1 = time.perf_counter()
    try:
        await container.start()
        t2 = time.perf_counter()
        state = await container.wait()
        t3 = time.perf_counter()
    finally:
        await container.delete(force=True)
    t4 = time.perf_counter()
    if state.get("StatusCode") != 0:
        raise BenchmarkError(f"floor container exited {state}")
    phases.update(create=t1 - t0, start=t2 - t1, wait=t3 - t2, delete=t4 - t3, total=t4 - t0)
    return phases


async def runner_once(runner: DockerRunner, index: int) -> float:
    start = time.perf_counter()
    outcome = await runner.run({"bench": NAME, "i": index})
    elapsed = time.perf_counter() - start
    if isinstance(outcome, ExperimentFailure):
        raise BenchmarkError(f"no-op experiment failed: {outcome.message}")
    return elapsed


async def run(ctx: Context) -> None:
    n = 3 if ctx.smoke else 20
    networks = {"none": "none"} if ctx.smoke else NETWORKS
    exchange_base = ctx.scratch("exchange-")
    cli_base = ctx.scratch("cli-")
    samples: dict[tuple[str, str], list[float]] = {}
    phases: dict[str, list[dict[str, float]]] = {net: [] for net in networks}
    runners = {
        net: DockerRunner(
            IMAGE,
            command=NOOP_CMD,
            network=mode,
            labels=LABELS,
            exchange_base=exchange_base,
        )
        for net, mode in networks.items()
    }
    docker = aiodocker.Docker()
    try:
        variants: list[tuple[str, str, Callable[[int], Awaitable[float]]]] = []
        for net, mode in networks.items():
            runner = runners[net]

            async def do_runner(i: int, runner: DockerRunner = runner) -> float:
                return await runner_once(runner, i)

            async def do_floor(i: int, mode: str | None = mode, net: str = net) -> float:
                result = await floor_once(docker, mode)
                if i >= 0:
                    phases[net].append(result)
                return result["total"]

            async def do_cli(i: int, mode: str | None = mode) -> float:
                return await cli_run_once(cli_base, network=mode, index=i)

            variants += [("runner", net, do_runner), ("floor", net, do_floor), ("cli", net, do_cli)]
        for _, _, fn in variants:  # warm-up: image digest lookup, first connections
            await fn(-1)
        for i in range(n):
            shift = i % len(variants)
            for kind, net, fn in variants[shift:] + variants[:shift]:
                samples.setdefault((kind, net), []).append(await fn(i))
    finally:
        for runner in runners.values():
            await runner.aclose()
        await docker.close()

    rows = []
    for (kind, net), values in samples.items():
        rows.append(
            [
                kind,
                net,
                len(values),
                fmt_ms(median(values)),
                fmt_ms(percentile(values, 90)),
                fmt_ms(min(values)),
                fmt_ms(max(values)),
            ]
        )
    print(f"  sequential no-op experiments on {IMAGE}, N={n} per variant, interleaved")
    table(["variant", "network", "n", "median ms", "p90 ms", "min ms", "max ms"], rows)
    noisy = [
        f"{kind}/{net}"
        for (kind, net), values in samples.items()
        if percentile(values, 90) > NOISY_SPREAD * median(values)
    ]
    if noisy:
        print(
            f"  NOISY: p90 > {NOISY_SPREAD}x median for {', '.join(noisy)}: the daemon was busy "
            "with other work; compare ratios only, and rerun when the machine is quiet"
        )
    for net, items in phases.items():
        means = {key: median([p[key] for p in items]) for key in items[0]}
        print(
            f"  floor phases ({net}, median ms): "
            + ", ".join(f"{key} {fmt_ms(value)}" for key, value in means.items())
        )
    for net in networks:
        r = median(samples[("runner", net)])
        f = median(samples[("floor", net)])
        c = median(samples[("cli", net)])
        print(
            f"  network={net}: runner - floor = {fmt_ms(r - f)} ms/experiment; "
            f"cli - runner = {fmt_ms(c - r)} ms/experiment"
        )
        ctx.check(f"runner/floor median [{net}]", f"{r / f:.3f}", "<= 1.10", r / f <= 1.10)
        ctx.check(f"runner/cli median [{net}]", f"{r / c:.3f}", "< 1.0", r / c < 1.0)
