"""GPU discovery: what NVML (or CUDA_VISIBLE_DEVICES) says this host has.

Owns every call into NVML; the pool asks here and never imports pynvml itself.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

__all__ = [
    "match_visible",
    "nvml_cpu_affinity",
    "nvml_inventory",
    "nvml_names",
    "nvml_processes",
    "nvml_thermal",
    "nvml_used_memory_mb",
    "parse_visible_devices",
]

log = structlog.get_logger("llem_dispatch.gpu")

_T = TypeVar("_T")


def nvml_used_memory_mb(device_id: str) -> float | None:
    """Memory in use on a device (index or UUID) in MiB, per NVML; None if unknown."""
    return _ask_device(device_id, "memory", lambda nvml, handle: _memory_used(nvml, handle) / 2**20)


def nvml_thermal(device_id: str) -> tuple[float, float] | None:
    """(temperature in C, power in W) of a device, per NVML; None if unknown."""

    def read(nvml: Any, handle: Any) -> tuple[float, float]:
        temperature = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        return float(temperature), float(nvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0

    return _ask_device(device_id, "thermal", read)


def nvml_cpu_affinity(device_id: str) -> tuple[int, ...] | None:
    """The host cores nearest a device (its NUMA node's), per NVML; None if unknown."""

    def read(nvml: Any, handle: Any) -> tuple[int, ...]:
        words = (os.cpu_count() or 1) // 64 + 1
        masks = nvml.nvmlDeviceGetCpuAffinity(handle, words)
        return tuple(
            word * 64 + bit
            for word, mask in enumerate(masks)
            for bit in range(64)
            if int(mask) >> bit & 1
        )

    return _ask_device(device_id, "cpu affinity", read) or None


def nvml_processes(device_id: str) -> list[str]:
    """'pid 1234 (python3, 812 MiB)' for each compute process on a device, per NVML."""

    def read(nvml: Any, handle: Any) -> list[str]:
        found = []
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            used = getattr(proc, "usedGpuMemory", None)
            size = f", {int(used) // 2**20} MiB" if isinstance(used, int) else ""
            found.append(f"pid {proc.pid} ({_process_name(proc.pid)}{size})")
        return found

    return _ask_device(device_id, "processes", read) or []


def _ask_device(device_id: str, what: str, ask: Callable[[Any, Any], _T]) -> _T | None:
    """One question to NVML about one device; None when NVML cannot answer it.

    An unknown reading is never a failure: it is logged at debug level.
    """
    nvml = _pynvml()
    if nvml is None:
        return None
    try:
        _nvml_init()
        return ask(nvml, _handle(nvml, device_id))
    except Exception as exc:  # noqa: BLE001 - unknown is an answer, never a reason to stop
        log.debug(f"gpu_{what}_unknown", device=device_id, error=repr(exc))
        return None


def nvml_names(indices: list[str]) -> dict[str, str]:
    """The product name ('NVIDIA H200') of each NVML device index given; {} without NVML."""
    pynvml = _pynvml()
    if pynvml is None or not indices:
        return {}
    try:
        _nvml_init()
        return {
            i: _text(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(int(i))))
            for i in indices
            if i.isdigit()
        }
    except Exception as exc:  # noqa: BLE001 - a name is a record detail, never a failure
        log.debug("gpu_names_unknown", error=repr(exc))
        return {}


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "not visible here"


def _memory_used(pynvml: Any, handle: Any) -> int:
    """Bytes in use, without the driver's own reserve where NVML can tell them apart.

    NVML's v1 `used` counts the driver's reserve (about 600 MiB on an idle H200,
    where nvidia-smi shows 0 MiB): that alone would hold back an idle GPU.
    """
    version = getattr(pynvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle, version=version).used)
        except Exception as exc:  # noqa: BLE001 - older drivers: the v1 figure below
            log.debug("gpu_memory_v2_unavailable", error=repr(exc))
    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def _handle(pynvml: Any, device_id: str) -> Any:
    """NVML's handle for a device index ("0") or UUID ("GPU-...", "MIG-...")."""
    if device_id.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(device_id))
    return pynvml.nvmlDeviceGetHandleByUUID(device_id)


def _pynvml() -> Any | None:
    # Optional dependency (the `nvml` extra): imported only when NVML is wanted,
    # so hosts without it never pay for or fail on it.
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


@functools.cache
def _nvml_init() -> None:
    # Once per process: nvmlInit can take a noticeable time and NVML counts its
    # users, so leaving it initialised costs nothing. A failure is not cached
    # and is retried next time.
    pynvml = _pynvml()
    if pynvml is not None:
        pynvml.nvmlInit()


def nvml_inventory() -> tuple[list[tuple[str, str]] | None, str]:
    """(index, UUID) of every NVML device, or None and why NVML is unusable."""
    pynvml = _pynvml()
    if pynvml is None:
        return None, "pynvml is not installed (pip install 'llem-dispatch[nvml]')"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "fall back"
        return None, f"NVML could not start: {exc!r}"
    try:
        devices = []
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            devices.append((str(index), _text(pynvml.nvmlDeviceGetUUID(handle))))
    except Exception as exc:  # noqa: BLE001 - a half-working driver falls back too
        log.warning("gpu_nvml_query_failed", error=repr(exc))
        return None, f"NVML device query failed: {exc!r}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down is best effort
            log.debug("gpu_nvml_shutdown_failed", error=repr(exc))
    return devices, "ok"


def _text(value: Any) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_visible_devices(value: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of entries; None when unset; [] when it hides all."""
    if value is None:
        return None
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if entries[:1] == ["-1"]:
        return []
    unique = list(dict.fromkeys(entries))
    if len(unique) != len(entries):
        log.warning("gpu_duplicate_visible_devices", value=value, kept=unique)
    return unique


def match_visible(visible: list[str], uuids: dict[str, str]) -> list[str]:
    """NVML indices for CUDA_VISIBLE_DEVICES entries (indices, UUIDs or UUID prefixes)."""
    ids: list[str] = []
    for entry in visible:
        if entry in uuids:
            match: str | None = entry
        else:
            hits = [i for i, u in uuids.items() if u == entry or u.startswith(entry)]
            match = hits[0] if len(hits) == 1 else None
        if match is None and entry.isdigit():
            # CUDA ignores an index with no device behind it, and so do we.
            log.warning("gpu_visible_device_missing", entry=entry, nvml_devices=len(uuids))
            continue
        if match is None:
            # A MIG UUID, say, which NVML does not list as a device: keep it as written.
            log.info("gpu_visible_device_unmatched", entry=entry)
            match = entry
        if match not in ids:
            ids.append(match)
    return ids
