"""Sensing: what the pool's devices say now (memory in use, temperature and power).

Every read happens on a worker thread (`anyio.to_thread.run_sync`), all the
devices a scheduling step needs in one hop, so a slow or hung driver call
never stalls the event loop; a probe that raises reads as unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio.to_thread
import structlog

from llem_dispatch.gpu.discovery import nvml_processes
from llem_dispatch.gpu.schedule import Reading
from llem_dispatch.gpu.thermal import Sensor, read_sensor

__all__ = ["DeviceSensing", "MemoryProbe"]

log = structlog.get_logger("llem_dispatch.gpu")

#: Memory in use on a device in MiB, or None when unknown.
MemoryProbe = Callable[[str], float | None]


class DeviceSensing:
    """Reads the devices through the given probes (NVML's in a real pool), off the loop.

    Without a `memory` probe memory reads as None (no check); likewise `thermal`.
    """

    def __init__(
        self,
        *,
        memory: MemoryProbe | None = None,
        thermal: Sensor | None = None,
        processes: Callable[[str], list[str]] = nvml_processes,
    ) -> None:
        self._memory = memory
        self._thermal = thermal
        self._processes = processes

    async def read(self, device_ids: Sequence[str]) -> dict[str, Reading]:
        """One `Reading` per id, taken together on a worker thread."""
        if not device_ids:
            return {}
        ids = tuple(device_ids)
        return await anyio.to_thread.run_sync(self._read_all, ids)

    async def processes(self, device_id: str) -> list[str]:
        """'pid 1234 (python3, 812 MiB)' for each compute process on the device, if known."""
        return await anyio.to_thread.run_sync(self._processes, device_id)

    def _read_all(self, device_ids: tuple[str, ...]) -> dict[str, Reading]:
        return {
            d: Reading(
                memory_mb=self._read_memory(d),
                thermal=read_sensor(self._thermal, d) if self._thermal is not None else None,
            )
            for d in device_ids
        }

    def _read_memory(self, device_id: str) -> float | None:
        if self._memory is None:
            return None
        try:
            return self._memory(device_id)
        except Exception as exc:  # noqa: BLE001 - a broken probe must not stall the pool
            log.warning("gpu_memory_probe_failed", device=device_id, error=repr(exc))
            return None
