"""The Slurm example's experiment: which node and GPUs it got, and a timed loop.

Run by llem-dispatch's helper (`function: experiment:run`) inside a Slurm job:
`CUDA_VISIBLE_DEVICES` holds the GPUs Slurm assigned; a real study would build
its model on them and measure here.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any


def run(config: dict[str, Any]) -> dict[str, Any]:
    """One experiment: a small CPU loop of `size` steps, and where it ran."""
    started = time.perf_counter()
    total = 0
    for i in range(int(config["size"]) * 100):
        total += i * i
    return {
        "node": socket.gethostname(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "seconds": time.perf_counter() - started,
        "checksum": total % 997,
    }
