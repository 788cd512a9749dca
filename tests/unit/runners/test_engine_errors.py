"""The container edge raises the engine's own classes: Podman's name Podman and its URL."""

from __future__ import annotations

from collections.abc import Callable

import aiodocker
import pytest

from llem_dispatch._docker import hung_error, image_missing_error, translate_api_error
from llem_dispatch._engine import ContainerEngine, docker_engine
from llem_dispatch.errors import (
    DockerDaemonHungError,
    DockerError,
    DockerGPUAccessError,
    DockerImagePullError,
    DockerPermissionError,
    DockerTimeoutError,
    DockerUnavailableError,
    LlemError,
)
from llem_dispatch.runners._container_run import DOCKER_ERRORS, engine_errors
from llem_dispatch.runners.podman_kind import podman_engine

PODMAN = podman_engine("unix:///run/llem-podman/podman.sock")
DOCKER = docker_engine("unix:///var/run/docker.sock")


def _api(status: int, message: str) -> aiodocker.DockerError:
    return aiodocker.DockerError(status, {"message": message})


CASES: list[tuple[str, Callable[[ContainerEngine], LlemError], type[DockerError]]] = [
    (
        "5xx",
        lambda e: translate_api_error(_api(500, "boom"), image="i", phase="start", engine=e),
        DockerError,
    ),
    (
        "gpu",
        lambda e: translate_api_error(
            _api(500, "could not select device driver"), image="i", phase="create", engine=e
        ),
        DockerGPUAccessError,
    ),
    (
        "missing",
        lambda e: translate_api_error(
            _api(404, "no such image"), image="i", phase="create", engine=e
        ),
        DockerImagePullError,
    ),
    (
        "refused",
        lambda e: translate_api_error(
            ConnectionRefusedError("refused"), image="i", phase="ping", engine=e
        ),
        DockerUnavailableError,
    ),
    (
        "denied",
        lambda e: translate_api_error(PermissionError("denied"), image="i", phase="ping", engine=e),
        DockerPermissionError,
    ),
    ("hung", lambda e: hung_error("create", 5.0, engine=e), DockerDaemonHungError),
    ("image", lambda e: image_missing_error("img:1", engine=e), DockerImagePullError),
]


@pytest.mark.parametrize(("case", "make", "docker_cls"), CASES, ids=[c[0] for c in CASES])
def test_the_edge_picks_the_engine_class(
    case: str, make: Callable[[ContainerEngine], LlemError], docker_cls: type[DockerError]
) -> None:
    on_docker: LlemError = make(DOCKER)
    on_podman: LlemError = make(PODMAN)
    assert type(on_docker) is docker_cls
    assert type(on_podman) is docker_cls.for_engine("Podman")
    assert type(on_podman).__name__.startswith("Podman")
    assert isinstance(on_podman, docker_cls)  # `except DockerX` still catches it
    assert on_podman.transient == on_docker.transient
    assert "Docker" not in on_podman.message
    assert "Podman" in on_podman.message or PODMAN.url in on_podman.message


def test_a_podman_runs_lifecycle_classes_are_podmans() -> None:
    errors = engine_errors(PODMAN)
    assert errors.timeout.__name__ == "PodmanTimeoutError"
    assert errors.hang.__name__ == "PodmanHangError"
    assert errors.oom.__name__ == "PodmanOOMError"
    assert errors.bad_exit.__name__ == "PodmanContainerError"
    assert errors.other.__name__ == "PodmanError"
    assert issubclass(errors.timeout, DockerTimeoutError)
    assert str(PODMAN) in errors.slow_start
    assert "Docker" not in errors.slow_start


def test_a_docker_runs_lifecycle_classes_are_dockers() -> None:
    errors = engine_errors(DOCKER)
    assert (errors.timeout, errors.hang, errors.oom, errors.bad_exit, errors.other) == (
        DOCKER_ERRORS.timeout,
        DOCKER_ERRORS.hang,
        DOCKER_ERRORS.oom,
        DOCKER_ERRORS.bad_exit,
        DOCKER_ERRORS.other,
    )
    assert "Docker at unix:///var/run/docker.sock" in errors.slow_start


def test_an_engine_without_classes_of_its_own_raises_dockers() -> None:
    other = ContainerEngine("Nerdctl", "unix:///run/containerd/nerdctl.sock")
    assert engine_errors(other).timeout is DockerTimeoutError
    assert type(hung_error("start", 1.0, engine=other)) is DockerDaemonHungError
