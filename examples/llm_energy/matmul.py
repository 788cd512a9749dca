"""A plain GPU load for the telemetry check: bf16 matrix products for `seconds`.

Reports its own NVML energy over its own window (the total-energy counter of its
GPU read just before and just after), the figure the dispatcher's telemetry is
compared with (`measure:` in study-telemetry-check.yaml).
"""

from __future__ import annotations

import os
import time
from typing import Any


def _handle(nvml: Any) -> Any:
    """NVML's handle of the GPU this experiment was given (LLEM_GPU_IDS: index or UUID)."""
    gpu = os.environ.get("LLEM_GPU_IDS", "0").split(",")[0]
    if gpu.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(gpu))
    return nvml.nvmlDeviceGetHandleByUUID(gpu)


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Matrix products of size `n` for `seconds`; the window's time and NVML energy."""
    import pynvml
    import torch

    pynvml.nvmlInit()
    handle = _handle(pynvml)
    n = int(config.get("n", 8192))
    seconds = float(config["seconds"])
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):  # warm-up, not measured
        a @ b
    torch.cuda.synchronize()
    products = 0
    before = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    t_start = time.time()
    while time.time() - t_start < seconds:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        products += 20
    t_end = time.time()
    after = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    return {
        "t_start": t_start,
        "t_end": t_end,
        "window_s": t_end - t_start,
        "total_energy_j": (after - before) / 1000.0,
        "tflops": 2 * n**3 * products / (t_end - t_start) / 1e12,
        "gpu": os.environ.get("LLEM_GPU_IDS", ""),
    }
