"""GPUs: the pool that hands them out, its pure scheduling core, sensing and discovery (NVML).

`GpuPool` (pool.py) is the async shell; `Schedule` (schedule.py) decides which
ids go to whom and when on plain values; `DeviceSensing` (sensing.py) reads the
devices off the event loop; discovery.py owns every NVML call.
"""

from llem_dispatch.gpu.discovery import nvml_used_memory_mb
from llem_dispatch.gpu.lease import GpuLease
from llem_dispatch.gpu.pool import GpuPool, GpuPoolOptions
from llem_dispatch.gpu.schedule import GpuHolding
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
