"""7. Cluster overhead: the same sweep on 4 GPUs of one host vs 2 Ray nodes x 2 GPUs.

The same 1-GPU experiments (a container that sleeps `SLEEP_S`, then writes its
result) run through the local `Dispatcher` on a pool of 4 virtual GPUs and
through `RayDispatcher` on a 3-node Ray cluster started on this machine (a head
without GPUs, two workers of 2 logical GPUs each), both against this host's
Docker daemon. Rounds are ABBA-ordered so drift on a shared machine hits both.
The ratio is the Ray sweep's wall time over the local one's; target <= 1.25 (on
sleep-1 s experiments, Ray's task round trips and the extra raylet processes may
cost a quarter more at most). Also shown: queued-to-started latency on an idle
cluster (the first wave), where Ray's scheduling and worker start show most.
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from typing import Any

from benchmarks._common import IMAGE, LABELS, BenchmarkError, Context, fmt_ms, table
from llem_dispatch import DockerRunner, GpuPool
from llem_dispatch.dispatch import Dispatcher, RunRecord

NAME = "cluster_overhead"
TITLE = "sweep wall time: RayDispatcher on 2 nodes x 2 GPUs vs Dispatcher on 4 GPUs"
NEEDS_DOCKER = True

SLEEP_S = 1.0
GPUS = 4
TARGET = 1.25


def _runner(ctx: Context) -> DockerRunner:
    script = f'sleep {SLEEP_S}; echo {{}} > "$LLEM_RESULT_PATH"'
    return DockerRunner(
        IMAGE,
        command=["sh", "-c", script],
        network="none",
        shm_size="16m",
        gpu_passthrough=False,
        labels=LABELS,
        exchange_base=ctx.workdir,
    )


def _node_runner(ctx: Context, node: Any) -> DockerRunner:
    return _runner(ctx)


async def _sweep(dispatcher: Dispatcher, count: int, tag: str) -> tuple[float, list[RunRecord]]:
    configs = [{"bench": NAME, "tag": tag, "i": i} for i in range(count)]
    start = time.perf_counter()
    records = [r async for r in dispatcher.map(configs, gpus=1)]
    elapsed = time.perf_counter() - start
    bad = [r for r in records if not r.ok]
    if bad:
        raise BenchmarkError(f"{tag}: {len(bad)} failed, first: {bad[0].error or bad[0].failure}")
    return elapsed, records


def _first_wave_latency(records: list[RunRecord]) -> float:
    """Median queued -> started of the earliest GPUS experiments (no GPU wait involved)."""
    waits = sorted(
        (r.started_at, (r.started_at - r.queued_at).total_seconds())
        for r in records
        if r.started_at is not None
    )
    return statistics.median(wait for _, wait in waits[:GPUS])


async def run(ctx: Context) -> None:
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError as exc:
        raise BenchmarkError("needs Ray: pip install -e '.[ray]'") from exc
    from llem_dispatch.cluster import RayDispatcher

    count = 8 if ctx.smoke else 24
    rounds = 1 if ctx.smoke else 2
    per_round = count // rounds
    start = time.perf_counter()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=GPUS // 2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    print(f"  Ray cluster of 3 nodes up in {time.perf_counter() - start:.1f}s")
    walls: dict[str, float] = {"local": 0.0, "ray": 0.0}
    latency: dict[str, list[float]] = {"local": [], "ray": []}
    nodes_used: set[str] = set()
    try:
        # Warm-up both paths (Ray starts its worker processes on first use).
        async with RayDispatcher(partial(_node_runner, ctx)) as warm:
            await _sweep(warm, GPUS, "warm-ray")
        async with Dispatcher(_runner(ctx), pool=GpuPool.virtual_devices(GPUS)) as warm_local:
            await _sweep(warm_local, GPUS, "warm-local")
        for r in range(rounds):
            order = ("local", "ray") if r % 2 == 0 else ("ray", "local")
            for variant in order:
                dispatcher: Dispatcher
                if variant == "ray":
                    dispatcher = RayDispatcher(partial(_node_runner, ctx))
                else:
                    dispatcher = Dispatcher(_runner(ctx), pool=GpuPool.virtual_devices(GPUS))
                async with dispatcher:
                    elapsed, records = await _sweep(dispatcher, per_round, f"{variant}{r}")
                walls[variant] += elapsed
                latency[variant].append(_first_wave_latency(records))
                nodes_used |= {r.node.node_id for r in records if r.node is not None}
    finally:
        ray.shutdown()
        cluster.shutdown()
    ideal = count / GPUS * SLEEP_S
    print(
        f"  {count} experiments of sleep {SLEEP_S:g}s, 1 GPU each, per variant "
        f"({rounds} ABBA round(s)); ideal {ideal:.1f}s if starting cost nothing"
    )
    table(
        ["variant", "wall s", "x ideal", "first-wave queued->started ms"],
        [
            [
                name,
                f"{walls[name]:.2f}",
                f"{walls[name] / ideal:.2f}",
                fmt_ms(statistics.median(latency[name])),
            ]
            for name in ("local", "ray")
        ],
    )
    if len(nodes_used) != 2:
        raise BenchmarkError(f"the Ray sweep used {len(nodes_used)} node(s), expected 2")
    ratio = walls["ray"] / walls["local"]
    ctx.check("ray/local sweep wall time", f"{ratio:.3f}", f"<= {TARGET}", ratio <= TARGET)
