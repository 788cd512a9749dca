"""One real GPU experiment: a bf16 matmul loop, timed, with NVML energy over its run.

Reports which GPU(s) it saw (UUIDs), so the sweep can check that each experiment
got exactly the GPU it was assigned and nothing else.
"""

from __future__ import annotations

import os
import time
from typing import Any


def _energy_mj(uuid: str) -> float | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except Exception:  # noqa: BLE001 - energy is optional: recorded as None
        return None


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Multiply n x n bf16 matrices for `seconds`; report TFLOP/s, GPUs seen, energy."""
    import torch

    n = int(config.get("n", 8192))
    seconds = float(config.get("seconds", 3.0))
    count = torch.cuda.device_count()
    uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(count)]
    uuids = [u if u.startswith("GPU-") else f"GPU-{u}" for u in uuids]
    start_wall = time.time()
    energy_start = {u: _energy_mj(u) for u in uuids}
    a = torch.randn(n, n, device="cuda:0", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda:0", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        iters += 10
    elapsed = time.perf_counter() - t0
    energy_end = {u: _energy_mj(u) for u in uuids}
    energy_j = {
        u: (energy_end[u] - energy_start[u]) / 1e3  # type: ignore[operator]
        if energy_start[u] is not None and energy_end[u] is not None
        else None
        for u in uuids
    }
    return {
        "visible_uuids": uuids,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "llem_gpu_ids": os.environ.get("LLEM_GPU_IDS", ""),
        "iters": iters,
        "elapsed_s": elapsed,
        "tflops": 2.0 * n**3 * iters / elapsed / 1e12,
        "energy_j": energy_j,
        "start_wall": start_wall,
        "end_wall": time.time(),
    }
