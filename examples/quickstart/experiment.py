"""Quickstart experiment: matrix-multiply throughput and time per op (energy when NVML has it).

Run by llem-dispatch's container helper (`function: experiment:run`): it gets the
config dict and returns the result dict. Uses numpy when the image has it and
pure Python otherwise; which one ran is recorded.
"""

from __future__ import annotations

import os
import platform
import random
import time
from typing import Any


def _energy_mj() -> tuple[float | None, str]:
    """Total GPU energy counter (mJ) of the first visible GPU, or why not."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None, "unavailable: no pynvml in this image"
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)), "nvml"
    except Exception as exc:  # noqa: BLE001 - no GPU is a normal case here
        return None, f"unavailable: {type(exc).__name__}"


def _matmul_python(n: int, batch: int) -> None:
    rng = random.Random(n)
    a = [[rng.random() for _ in range(n)] for _ in range(n)]
    b_t = [[rng.random() for _ in range(n)] for _ in range(n)]
    for _ in range(batch):
        [[sum(x * y for x, y in zip(row, col, strict=True)) for col in b_t] for row in a]


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Time `repeats` rounds of `batch` n x n matmuls in `dtype`."""
    n = int(config["size"])
    dtype = str(config.get("dtype", "float64"))
    batch = int(config.get("batch", 1))
    repeats = int(config.get("repeats", 3))
    try:
        import numpy as np

        impl = "numpy"
        rng = np.random.default_rng(n)
        a = rng.random((n, n)).astype(dtype)
        b = rng.random((n, n)).astype(dtype)

        def one_round() -> None:
            for _ in range(batch):
                a @ b
    except ImportError:
        impl = "python"

        def one_round() -> None:
            _matmul_python(n, batch)

    energy_start, energy_source = _energy_mj()
    one_round()  # warm-up, not measured
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_round()
        times.append(time.perf_counter() - t0)
    energy_end, _ = _energy_mj()
    best = min(times)
    flops = 2.0 * n**3 * batch
    return {
        "impl": impl,
        "size": n,
        "dtype": dtype,
        "batch": batch,
        "time_per_op_ms": best / batch * 1e3,
        "gflops": flops / best / 1e9,
        "times_s": times,
        "energy_j": (energy_end - energy_start) / 1e3
        if energy_start is not None and energy_end is not None
        else None,
        "energy_source": energy_source,
        "gpu_ids": os.environ.get("LLEM_GPU_IDS", ""),
        "python": platform.python_version(),
    }
