"""Runners: execute one experiment under the container protocol (Docker or local process).

Runner kinds (`local`, `docker`, kinds from other packages) are named in one
registry: see `llem_dispatch.runners.kinds`.

`DockerRunner` is imported on first use (PEP 562): the Docker client (aiodocker,
aiohttp) costs about half a second to import, and a `FakeRunner` or a local run
never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llem_dispatch.runners._cancel import (
    CANCEL_SLACK_S,
    ForceKill,
    current_force_kill,
    force_kill_requested,
    set_force_kill,
    wait_until_forced,
)
from llem_dispatch.runners.kinds import (
    DoctorCheck,
    RunnerKind,
    RunnerOptions,
    get_runner_kind,
    register_runner_kind,
    runner_kinds,
)
from llem_dispatch.runners.local import LocalRunner, LocalRunnerKind
from llem_dispatch.runners.protocol import GatedRunner, Outcome, RunInfo, Runner, RunObserver
from llem_dispatch.runners.routing import RoutingRunner

__all__ = [
    "CANCEL_SLACK_S",
    "DockerRunner",
    "DoctorCheck",
    "ForceKill",
    "GatedRunner",
    "LocalRunner",
    "LocalRunnerKind",
    "Outcome",
    "RoutingRunner",
    "RunInfo",
    "RunObserver",
    "Runner",
    "RunnerKind",
    "RunnerOptions",
    "current_force_kill",
    "force_kill_requested",
    "get_runner_kind",
    "register_runner_kind",
    "runner_kinds",
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
