"""Load: many short experiments through the real daemon at concurrency 16.

All complete, no container is left, and the dispatcher's open file descriptors and
RSS stay flat from the first tenth of the run to the end.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import pytest

from llem_dispatch import DockerRunner
from llem_dispatch.dispatch import Dispatcher
from llem_dispatch.gpu import GpuPool
from tests.conftest import BUSYBOX_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.usefixtures("no_leaked_containers")]

# 1,000 takes a few minutes on a 2-core CI machine; LLEM_LOAD_N lowers it for quick runs.
N = int(os.environ.get("LLEM_LOAD_N", "1000"))
CONCURRENCY = 16


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(1800)
async def test_many_short_experiments_fds_and_rss_flat(
    test_labels: dict[str, str], exchange_base: Path
) -> None:
    runner = DockerRunner(
        BUSYBOX_IMAGE,
        command=["sh", "-c", 'echo "{}" > "$LLEM_RESULT_PATH"'],
        labels=test_labels,
        exchange_base=exchange_base,
        shm_size="8m",
        network="none",
        gpu_passthrough=False,
    )
    samples: list[tuple[int, int, float]] = []
    done = 0
    async with Dispatcher(
        runner, pool=GpuPool.virtual_devices(CONCURRENCY), max_concurrency=CONCURRENCY
    ) as dispatcher:
        # Warm-up batch: connection pools, caches and imports settle before measuring.
        warm = [r async for r in dispatcher.map([{"warm": i} for i in range(32)], gpus=1)]
        assert all(r.ok for r in warm)
        start = (open_fds(), rss_mb())
        with anyio.fail_after(1700):
            async for record in dispatcher.map([{"i": i} for i in range(N)], gpus=1):
                assert record.ok, record.error
                done += 1
                if done % max(1, N // 10) == 0:
                    samples.append((done, open_fds(), rss_mb()))
        end = (open_fds(), rss_mb())
    assert done == N
    print(f"\nload: {N} experiments at concurrency {CONCURRENCY}")
    print(f"  after warm-up (idle): fds={start[0]} rss={start[1]:.1f} MB")
    for count, fds, rss in samples:
        print(f"  after {count:5d} (busy): fds={fds:4d} rss={rss:6.1f} MB")
    print(f"  at the end (idle):    fds={end[0]} rss={end[1]:.1f} MB")
    assert end[0] <= start[0] + 2, f"fds grew: {start[0]} -> {end[0]}"
    assert end[1] <= start[1] + 20, f"RSS grew: {start[1]:.1f} -> {end[1]:.1f} MB"
    left = subprocess.run(
        ["docker", "ps", "-aq", "--filter", "label=llem.test=1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert left == []
    assert list(exchange_base.iterdir()) == []
