"""Sample every GPU's NVML counters to JSON lines until stopped: an outside view of a sweep.

    python examples/llm_energy/monitor.py OUT.jsonl [--interval 0.2]

One line per sample and GPU: wall time, index, UUID, total-energy counter (mJ), power
(W), temperature (C), utilisation (%) and memory in use (MiB). `report.py --monitor
OUT.jsonl` uses it to check each experiment's own energy reading against the counter
over its window, and to show which GPUs were busy when. Stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any


def sample(pynvml: Any, handles: list[tuple[int, str, Any]]) -> list[dict[str, Any]]:
    """One reading of every GPU."""
    now = time.time()
    rows = []
    for index, uuid, handle in handles:
        rows.append(
            {
                "t": now,
                "index": index,
                "uuid": uuid,
                "energy_mj": pynvml.nvmlDeviceGetTotalEnergyConsumption(handle),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                "temp_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
                "util": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                "mem_mib": pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Sample until SIGTERM/SIGINT; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--interval", type=float, default=0.2)
    args = parser.parse_args(argv)
    import pynvml  # type: ignore[import-not-found]

    pynvml.nvmlInit()
    handles = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        handles.append((index, uuid.decode() if isinstance(uuid, bytes) else uuid, handle))
    stop = False

    def on_signal(_signum: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(args.out, "a", encoding="utf-8") as out:
        while not stop:
            for row in sample(pynvml, handles):
                out.write(json.dumps(row) + "\n")
            out.flush()
            time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
