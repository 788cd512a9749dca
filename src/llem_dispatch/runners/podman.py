"""PodmanRunner: a DockerRunner on Podman's engine object (its URL, its quirks).

Kept for library use (`PodmanRunner(image, docker_host=URL)`); the `podman` kind
builds the same thing as `DockerRunner(image, engine=podman_engine(url))`.
"""

from __future__ import annotations

from typing import Any

from llem_dispatch.runners.docker import DockerRunner
from llem_dispatch.runners.podman_kind import podman_engine

__all__ = ["PodmanRunner"]


class PodmanRunner(DockerRunner):
    """A DockerRunner talking to Podman (at `docker_host`, else `podman_url()`)."""

    def __init__(self, image: str, *, docker_host: str | None = None, **kwargs: Any) -> None:
        super().__init__(image, engine=podman_engine(docker_host), **kwargs)
