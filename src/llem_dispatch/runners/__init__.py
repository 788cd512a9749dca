"""Runners: execute one experiment under the container protocol (Docker or local process)."""

from llem_dispatch.runners._base import Outcome, RunInfo, Runner, RunObserver
from llem_dispatch.runners.docker import DockerRunner

__all__ = ["DockerRunner", "Outcome", "RunInfo", "RunObserver", "Runner"]
