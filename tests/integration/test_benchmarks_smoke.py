"""`python -m benchmarks --smoke` runs end to end, so the benchmark scripts never rot."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# cluster_overhead starts a Ray cluster: the smoke run needs the `ray` extra too.
pytestmark = [pytest.mark.docker, pytest.mark.ray]

BENCHMARKS = (
    "dispatch_overhead",
    "concurrency",
    "scheduler_scale",
    "gpu_packing",
    "handoff_gap",
    "log_flood",
    "cluster_overhead",
    "slow_start",
    "prepare_depth",
)
BENCH_LABEL = "label=llem.bench=1"


def _bench_containers() -> list[str]:
    proc = subprocess.run(
        ["docker", "ps", "-aq", "--filter", BENCH_LABEL],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.stdout.split()


@pytest.mark.timeout(240)
def test_benchmarks_smoke() -> None:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--smoke"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        leaked = _bench_containers()
    finally:
        # Whatever happened (a timeout kills only the top process), leave nothing behind.
        left = _bench_containers()
        if left:
            subprocess.run(
                ["docker", "rm", "-f", *left], capture_output=True, timeout=60, check=False
            )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    assert "CRASH" not in output, output[-5000:]
    for name in BENCHMARKS:
        assert re.search(rf"^=== \[\d+/\d+\] {name}: ", proc.stdout, re.M), f"{name} header missing"
        assert re.search(rf"^  (PASS|MISS)  {name}: ", proc.stdout, re.M), f"{name} gave no verdict"
    assert leaked == [], f"benchmark containers left behind: {leaked}"
