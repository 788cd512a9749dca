"""Benchmarks of llem-dispatch against baselines measured in the same run.

Run `python -m benchmarks` (full) or `python -m benchmarks --smoke` (tiny sizes,
whole suite in well under a minute; CI runs it so the scripts never rot).
See benchmarks/README.md for what each one measures and the latest figures.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from benchmarks._common import Context

__all__ = ["BENCHMARKS", "Benchmark", "load"]

#: Benchmark name -> module, in the order they run.
BENCHMARKS: dict[str, str] = {
    "dispatch_overhead": "benchmarks.dispatch_overhead",
    "concurrency": "benchmarks.concurrency",
    "scheduler_scale": "benchmarks.scheduler_scale",
    "gpu_packing": "benchmarks.gpu_packing",
    "handoff_gap": "benchmarks.handoff_gap",
    "log_flood": "benchmarks.log_flood",
    "cluster_overhead": "benchmarks.cluster_overhead",
    "slow_start": "benchmarks.slow_start",
    "prepare_depth": "benchmarks.prepare_depth",
    "slurm_overhead": "benchmarks.slurm_overhead",
    "interference": "benchmarks.interference",
}


class Benchmark(Protocol):
    """What every benchmark module provides."""

    NAME: str
    TITLE: str
    NEEDS_DOCKER: bool
    run: Callable[[Context], Awaitable[None]]


def load(name: str) -> Benchmark:
    return cast("Benchmark", importlib.import_module(BENCHMARKS[name]))
