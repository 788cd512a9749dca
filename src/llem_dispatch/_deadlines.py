"""Deadlines of Engine API calls: plain values, importable without the Docker client.

A study file names them (`docker_deadlines:`), so loading one must not import aiodocker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEFAULT_DEADLINES", "ApiDeadlines"]


@dataclass(frozen=True, slots=True)
class ApiDeadlines:
    """Seconds each Docker API call may take before the daemon counts as hung.

    A healthy daemon answers these in well under a second, and in a few seconds
    at worst under heavy container churn on 2 cores (the 1,000-container load
    test); the defaults leave a wide margin over that. A call past its deadline
    raises `DockerDaemonHungError` (transient: the study retries it).
    """

    create: float = 60.0
    attach: float = 30.0
    start: float = 60.0
    inspect: float = 30.0
    kill: float = 15.0
    #: Beyond the stop grace period, for `docker stop` to return.
    stop: float = 15.0
    delete: float = 30.0
    image: float = 30.0
    list: float = 30.0
    logs: float = 60.0
    #: While a container runs, one bounded inspect this often proves the daemon answers.
    liveness_every: float = 30.0

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"ApiDeadlines.{name} must be a positive number, got {value!r}")

    def of(self, call: str) -> float:
        """The deadline of a call by name (`create`, `start`, ...)."""
        return float(getattr(self, call))


DEFAULT_DEADLINES = ApiDeadlines()
