"""Runners: execute one experiment under the container protocol (Docker or local process)."""

from llem_dispatch.runners._base import Outcome, RunInfo, Runner, RunObserver
from llem_dispatch.runners.docker import DockerRunner
from llem_dispatch.runners.local import LocalRunner

__all__ = ["DockerRunner", "LocalRunner", "Outcome", "RunInfo", "RunObserver", "Runner"]
