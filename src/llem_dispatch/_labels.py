"""Labels on every container we create, and who owns a container.

Each container carries the dispatcher's host, pid (with the pid's start time,
so a reused pid is not mistaken for the owner) and a per-process session id, so
`reap` can remove what a crashed dispatcher left behind.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "LABEL_CONFIG_HASH",
    "LABEL_EXCHANGE_DIR",
    "LABEL_HOST",
    "LABEL_MANAGED",
    "LABEL_PID",
    "LABEL_PID_START",
    "LABEL_PROBE",
    "LABEL_SESSION",
    "SESSION_ID",
    "base_labels",
    "owner_alive",
    "process_start_time",
]

LABEL_MANAGED = "llem.managed"
LABEL_CONFIG_HASH = "llem.config_hash"
LABEL_SESSION = "llem.session"
LABEL_HOST = "llem.host"
LABEL_PID = "llem.pid"
LABEL_PID_START = "llem.pid_start"
LABEL_EXCHANGE_DIR = "llem.exchange_dir"
LABEL_RESULTS_DIR = "llem.results_dir"
#: On `doctor`'s throwaway probe containers, so they are told apart from experiments.
LABEL_PROBE = "llem.probe"

SESSION_ID = uuid.uuid4().hex[:12]
HOSTNAME = socket.gethostname()


def process_start_time(pid: int) -> str | None:
    """The pid's start time in clock ticks since boot (Linux), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def base_labels() -> dict[str, str]:
    """Labels that identify this process as a container's owner."""
    pid = os.getpid()
    return {
        LABEL_MANAGED: "1",
        LABEL_SESSION: SESSION_ID,
        LABEL_HOST: HOSTNAME,
        LABEL_PID: str(pid),
        LABEL_PID_START: process_start_time(pid) or "",
    }


def owner_alive(labels: Mapping[str, str]) -> bool | None:
    """Is the dispatcher that created a container still running?

    True or False for containers of this host; None when the owner is on another
    host (we cannot tell, so we never touch it).
    """
    if labels.get(LABEL_HOST) != HOSTNAME:
        return None
    try:
        pid = int(labels.get(LABEL_PID, ""))
    except ValueError:
        return False
    if labels.get(LABEL_SESSION) == SESSION_ID and pid == os.getpid():
        return True
    start = process_start_time(pid)
    if start is None:
        return False
    recorded = labels.get(LABEL_PID_START)
    return not recorded or recorded == start
