"""Runners: execute one experiment under the container protocol (Docker or local process).

`DockerRunner` is imported on first use (PEP 562): the Docker client (aiodocker,
aiohttp) costs about half a second to import, and a `FakeRunner` or a local run
never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llem_dispatch.runners._lifecycle import (
    force_kill_requested,
    set_force_kill,
    wait_until_forced,
)
from llem_dispatch.runners.local import LocalRunner
from llem_dispatch.runners.protocol import GatedRunner, Outcome, RunInfo, Runner, RunObserver
from llem_dispatch.runners.routing import RoutingRunner

__all__ = [
    "DockerRunner",
    "GatedRunner",
    "LocalRunner",
    "Outcome",
    "RoutingRunner",
    "RunInfo",
    "RunObserver",
    "Runner",
    "force_kill_requested",
    "set_force_kill",
    "wait_until_forced",
]


def __getattr__(name: str) -> Any:
    if name != "DockerRunner":
        raise AttributeError(f"module 'llem_dispatch.runners' has no attribute {name!r}")
    from llem_dispatch.runners.docker import DockerRunner

    globals()[name] = DockerRunner
    return DockerRunner


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from llem_dispatch.runners.docker import DockerRunner
