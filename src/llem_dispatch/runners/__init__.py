"""Runners: execute one experiment under the container protocol (Docker or local process)."""

from llem_dispatch.runners._cancel import (
    force_kill_requested,
    set_force_kill,
    wait_until_forced,
)
from llem_dispatch.runners.docker import DockerRunner
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
