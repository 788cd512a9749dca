"""GPUs held by a task or job on the node it runs on: their state at start, their settling.

Shared by the placements whose attempts hold GPUs where they run (a Ray task, a Slurm
job); the local pool does the same through its schedule.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from llem_dispatch.gpu.discovery import nvml_thermal
from llem_dispatch.gpu.thermal import SettleSpec, ThermalGate

__all__ = ["gpus_at_start", "settle_after_exit"]


#: Idle (temperature, power) per GPU UUID (or id), learnt by this worker process at the
#: first task that gets the GPU: Ray hands a GPU on only once its holder let it go.
_IDLE: dict[str, tuple[float, float]] = {}


def gpus_at_start(
    ids: tuple[str, ...],
    uuids: Mapping[str, str],
    sensor: Callable[[str], tuple[float, float] | None] = nvml_thermal,
) -> list[dict[str, Any]]:
    """Each assigned GPU's id, UUID, temperature and power as the task begins."""
    found = []
    for gpu in ids:
        reading = sensor(uuids.get(gpu, gpu))
        if reading is not None:
            _IDLE.setdefault(uuids.get(gpu, gpu), reading)
        found.append(
            {
                "id": gpu,
                "uuid": uuids.get(gpu),
                "temperature_c": reading[0] if reading else None,
                "power_w": reading[1] if reading else None,
            }
        )
    return found


def settle_after_exit(
    ids: tuple[str, ...],
    uuids: Mapping[str, str],
    spec: SettleSpec,
    exited_at: float,
    *,
    sensor: Callable[[str], tuple[float, float] | None] = nvml_thermal,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Hold this task (and its GPUs) until they have settled, or `max_s` has passed.

    The same rule as the local pool's (`ThermalGate`), on this node's own GPUs;
    returns whether they settled before `max_s`.
    """
    keys = [uuids.get(gpu, gpu) for gpu in ids]
    baselines = {
        k: spec.baselines.get(gpu) or _IDLE.get(k) for gpu, k in zip(ids, keys, strict=True)
    }
    known = {k: b for k, b in baselines.items() if b is not None}
    gate = ThermalGate(spec.model_copy(update={"baselines": known}), sensor)
    for key in keys:
        gate.released(key)
    while True:
        now = clock()
        if all(gate.ready(key, exited_at, now) for key in keys):
            return now - exited_at < spec.max_s
        sleep(spec.sample_s)
