"""GPUs: the pool that hands them out (scheduling) and their discovery (NVML)."""

from llem_dispatch.gpu.discovery import nvml_used_memory_mb
from llem_dispatch.gpu.pool import GpuHolding, GpuLease, GpuPool, GpuPoolOptions
from llem_dispatch.gpu.thermal import Sensor, SettleReport, SettleSpec

__all__ = [
    "GpuHolding",
    "GpuLease",
    "GpuPool",
    "GpuPoolOptions",
    "Sensor",
    "SettleReport",
    "SettleSpec",
    "nvml_used_memory_mb",
]
