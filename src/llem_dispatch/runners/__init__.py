"""Runners: execute one experiment under the container protocol (Docker or local process).

Runner kinds (`local`, `docker`, kinds from other packages) are named in one
registry: see `llem_dispatch.runners.kinds`.
"""

from llem_dispatch.runners._cancel import (
    force_kill_requested,
    set_force_kill,
    wait_until_forced,
)
from llem_dispatch.runners.docker import DockerRunner
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
    "DockerRunner",
    "DoctorCheck",
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
    "force_kill_requested",
    "get_runner_kind",
    "register_runner_kind",
    "runner_kinds",
    "set_force_kill",
    "wait_until_forced",
]
