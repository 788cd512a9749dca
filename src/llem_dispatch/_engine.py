"""A container engine as a plain value: its name, where its API is, and its quirks.

Docker and Podman speak the same Engine API; they differ by the engine object a
runner talks to, never by a subclass editing its parent. Importing this costs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DEFAULT_DOCKER_URL", "ContainerEngine", "docker_engine", "docker_url"]

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"

_START_DOCKER = (
    "Start the Docker daemon (`sudo systemctl start docker` or `dockerd &`) and check "
    "DOCKER_HOST (or --engine-url); or use the local runner (--runner local)."
)


def docker_url() -> str:
    """The Docker daemon's address: DOCKER_HOST, else the standard local socket."""
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL


@dataclass(frozen=True, slots=True)
class ContainerEngine:
    """One engine speaking the Docker Engine API: what it is called, where, and how it differs.

    `str(engine)` is how messages, logs and records name it: "Podman at unix:///...".
    """

    #: What the engine is called ("Docker", "Podman").
    name: str
    #: Where its API answers (unix:///..., tcp://...).
    url: str
    #: The runner type its runs record (the kind's name).
    runner_type: str = "docker"
    #: It reads CDI specs from the default dirs itself (its /info does not list them).
    cdi_native: bool = False
    #: GPUs go to its containers by CDI name only (no NVIDIA device requests).
    cdi_only: bool = False
    #: The first version whose API honours device requests (None: every version).
    min_gpu_version: tuple[int, int] | None = None
    #: How to get it answering, said in every error that could not reach it.
    start_hint: str = _START_DOCKER
    #: Builds go through its API (`POST /build`) instead of the `docker build` CLI.
    builds_through_api: bool = False

    def __str__(self) -> str:
        return f"{self.name} at {self.url}"


def docker_engine(url: str | None = None) -> ContainerEngine:
    """The Docker daemon at `url` (default: DOCKER_HOST, else the standard socket)."""
    return ContainerEngine("Docker", url or docker_url())
