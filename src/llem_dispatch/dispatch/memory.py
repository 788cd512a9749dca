"""The host-memory reserve that prestarted runs must leave: prepared, waiting runs hold
host memory (weights read into it), and must not push the host into swap.

A prestart begins only while the host's MemAvailable is at least the reserve.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["DEFAULT_RESERVE_FRACTION", "MemoryReserve", "meminfo_bytes"]

#: Without a study's figure: keep this share of the host's total memory available.
DEFAULT_RESERVE_FRACTION = 0.2


def meminfo_bytes(field: str, path: Path = Path("/proc/meminfo")) -> int | None:
    """One /proc/meminfo field (e.g. `MemAvailable`) in bytes; None where unreadable."""
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            name, _, rest = line.partition(":")
            if name == field:
                return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemoryReserve:
    """Whether one more run may start early (and prepare) on this host now.

    `reserve_bytes` None: `DEFAULT_RESERVE_FRACTION` of MemTotal. `available`
    reads MemAvailable (a test gives its own). A host whose memory cannot be read
    (not Linux) always allows it.
    """

    def __init__(
        self,
        reserve_bytes: int | None = None,
        *,
        available: Callable[[], int | None] | None = None,
        total: Callable[[], int | None] | None = None,
    ) -> None:
        self._available = available or (lambda: meminfo_bytes("MemAvailable"))
        if reserve_bytes is None:
            known = (total or (lambda: meminfo_bytes("MemTotal")))()
            reserve_bytes = int(known * DEFAULT_RESERVE_FRACTION) if known else 0
        self.reserve_bytes = reserve_bytes

    def allows_prestart(self) -> bool:
        """Whether the host has at least the reserve available now."""
        available = self._available()
        return available is None or available >= self.reserve_bytes
