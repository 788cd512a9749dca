"""A host process group's cores and priority: affinity, nice and I/O class of every thread.

Linux only (`/proc`, `sched_setaffinity`, `ioprio_set`); elsewhere each step does
nothing. A thread that has gone meanwhile is skipped: the group lives on without us.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator

from llem_dispatch.runners.protocol import CpuPlacement

__all__ = ["group_threads", "place_group", "place_process"]

#: `nice` of a run preparing beside a measured one (the lowest CPU priority).
LOW_NICE = 19
#: ioprio_set(2) numbers per machine; its classes: 2 best-effort (the default), 3 idle.
_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "arm64": 30}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_BEST_EFFORT = 2 << _IOPRIO_CLASS_SHIFT | 4
_IOPRIO_IDLE = 3 << _IOPRIO_CLASS_SHIFT


def group_threads(pgid: int) -> Iterator[int]:
    """Every thread id of every process in process group `pgid`."""
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                    stat = f.read()
                # Field 5 (pgrp) after the command, which may hold spaces and parentheses.
                if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                    continue
                yield from (int(t) for t in os.listdir(f"/proc/{entry.name}/task"))
            except (OSError, ValueError, IndexError):
                continue


def place_process(tid: int, placement: CpuPlacement) -> None:
    """One thread onto `placement`'s cores, at its priority (each step best effort)."""
    if placement.cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, placement.cpus)
    # Back from a low priority needs privilege (CAP_SYS_NICE): without it a run
    # would measure at the nice it prepared at, so only root lowers it at all.
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, LOW_NICE if placement.low_priority else 0)
    _set_io_class(tid, idle=placement.low_priority)


def place_group(pgid: int, placement: CpuPlacement) -> int:
    """Every thread of process group `pgid` onto `placement`; how many were moved."""
    moved = 0
    for tid in group_threads(pgid):
        place_process(tid, placement)
        moved += 1
    return moved


def _set_io_class(tid: int, *, idle: bool) -> None:
    number = _IOPRIO_SET.get(platform.machine())
    if number is None or not hasattr(ctypes, "CDLL"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        value = _IOPRIO_IDLE if idle else _IOPRIO_BEST_EFFORT
        libc.syscall(number, _IOPRIO_WHO_PROCESS, tid, value)
