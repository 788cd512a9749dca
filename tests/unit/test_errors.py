"""The error tree: neutral bases, the Docker classes below them, and the payload form."""

from __future__ import annotations

import json

import pytest

import llem_dispatch
from llem_dispatch import errors
from llem_dispatch.errors import (
    DockerContainerError,
    DockerDaemonHungError,
    DockerError,
    DockerGPUAccessError,
    DockerHangError,
    DockerImagePullError,
    DockerOOMError,
    DockerPermissionError,
    DockerTimeoutError,
    DockerUnavailableError,
    EngineHungError,
    EnginePermissionError,
    EngineUnavailableError,
    ExperimentExitError,
    ExperimentHangError,
    ExperimentOOMError,
    ExperimentStartError,
    ExperimentTimeoutError,
    GpuAccessError,
    ImageError,
    LlemError,
    RunnerError,
)

#: Each Docker class (the seed's names, llenergymeasure's contract) and its neutral base.
DOCKER_AND_NEUTRAL: list[tuple[type[DockerError], type[RunnerError]]] = [
    (DockerImagePullError, ImageError),
    (DockerGPUAccessError, GpuAccessError),
    (DockerOOMError, ExperimentOOMError),
    (DockerTimeoutError, ExperimentTimeoutError),
    (DockerHangError, ExperimentHangError),
    (DockerPermissionError, EnginePermissionError),
    (DockerUnavailableError, EngineUnavailableError),
    (DockerDaemonHungError, EngineHungError),
    (DockerContainerError, ExperimentExitError),
]

NEUTRAL = [
    RunnerError,
    ExperimentStartError,
    GpuAccessError,
    ImageError,
    ExperimentTimeoutError,
    ExperimentHangError,
    ExperimentOOMError,
    ExperimentExitError,
    EnginePermissionError,
    EngineUnavailableError,
    EngineHungError,
]


def every_error_class() -> list[type[LlemError]]:
    """Every LlemError class the errors module defines, root included."""
    return [
        cls
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, LlemError)
        and cls.__module__ == errors.__name__
    ]


@pytest.mark.parametrize(("docker", "neutral"), DOCKER_AND_NEUTRAL)
def test_each_docker_class_is_its_neutral_class_and_a_docker_error(
    docker: type[DockerError], neutral: type[RunnerError]
) -> None:
    assert issubclass(docker, neutral)
    assert issubclass(docker, DockerError)
    # The neutral meaning comes first in the MRO, DockerError's behaviour after it.
    mro = docker.__mro__
    assert mro.index(neutral) < mro.index(DockerError) < mro.index(RunnerError)
    # Its own fix, never the neutral one that precedes DockerError in the MRO.
    assert "default_fix" in vars(docker)
    assert docker("x").fix_suggestion == vars(docker)["default_fix"]


def test_every_docker_class_is_listed() -> None:
    docker = {
        c for c in every_error_class() if issubclass(c, DockerError) and c.engine_name == "Docker"
    }
    assert docker - {DockerError} == {d for d, _ in DOCKER_AND_NEUTRAL}


@pytest.mark.parametrize("docker", [DockerError, *(d for d, _ in DOCKER_AND_NEUTRAL)])
def test_each_docker_class_has_a_podman_twin_below_it(docker: type[DockerError]) -> None:
    podman = docker.for_engine("Podman")
    assert podman is not docker
    assert issubclass(podman, docker)
    assert issubclass(podman, errors.PodmanError)
    assert podman.engine_name == "Podman"
    assert podman.__name__.startswith("Podman")
    assert podman.__name__ in errors.__all__
    assert podman("x").transient == docker("x").transient
    # What Podman's users are told to do names no Docker command or daemon.
    assert "docker" not in podman("x").fix_suggestion.lower()
    assert docker.for_engine("Docker") is docker
    assert docker.for_engine("Nerdctl") is docker  # an engine without classes: Docker's


def test_except_docker_class_catches_podmans() -> None:
    with pytest.raises(DockerTimeoutError) as caught:
        raise DockerTimeoutError.for_engine("Podman")("slow")
    assert type(caught.value).__name__ == "PodmanTimeoutError"
    assert isinstance(caught.value, ExperimentTimeoutError)
    hang = DockerHangError.for_engine("Podman")("quiet")
    assert isinstance(hang, errors.PodmanTimeoutError)
    assert isinstance(hang, DockerHangError)
    hung = DockerDaemonHungError.for_engine("Podman")("stuck")
    assert isinstance(hung, errors.PodmanUnavailableError)
    assert isinstance(hung, EngineHungError)


@pytest.mark.parametrize("neutral", NEUTRAL)
def test_neutral_classes_name_no_engine(neutral: type[RunnerError]) -> None:
    error = neutral("m")
    for text in (neutral.__name__, error.fix_suggestion, str(error), neutral.__doc__ or ""):
        assert "docker" not in text.lower()
        assert "daemon" not in text.lower()
    assert not issubclass(neutral, DockerError)


def test_transience_is_unchanged() -> None:
    transient = {c for c in every_error_class() if c("m").transient}
    assert transient == {
        errors.ClusterNodeLostError,
        EngineUnavailableError,
        EngineHungError,
        DockerUnavailableError,
        DockerDaemonHungError,
        errors.PodmanUnavailableError,
        errors.PodmanServiceHungError,
    }


def test_unavailable_is_no_longer_a_permission_error() -> None:
    assert not issubclass(DockerUnavailableError, DockerPermissionError)
    assert not issubclass(DockerUnavailableError, EnginePermissionError)
    assert issubclass(DockerDaemonHungError, DockerUnavailableError)


def test_the_module_docstring_draws_every_class() -> None:
    doc = errors.__doc__ or ""
    missing = [c.__name__ for c in every_error_class() if c.__name__ not in doc]
    assert not missing


def test_every_error_class_is_public() -> None:
    for cls in every_error_class():
        assert cls.__name__ in errors.__all__
        assert getattr(llem_dispatch, cls.__name__) is cls


def test_an_instance_may_differ_from_its_class_transience() -> None:
    assert DockerError("5xx", transient=True).transient
    assert not DockerUnavailableError("x", transient=False).transient
    assert not DockerError("4xx").transient


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("transient", [None, True, False])
def test_payload_round_trip_keeps_class_fields_and_transience(
    cls: type[LlemError], transient: bool | None
) -> None:
    kwargs: dict[str, object] = {"config_hash": "0123456789abcdef", "exchange_dir": "/tmp/x"}
    if issubclass(cls, RunnerError):
        kwargs |= {"stderr_snippet": "tail", "container_id": "c" * 64, "exit_code": 3}
        kwargs["log_path"] = "/tmp/x/container.log"
    original = cls("it broke", fix_suggestion="do this", transient=transient, **kwargs)  # type: ignore[arg-type]
    payload = json.loads(json.dumps(original.to_payload()))
    rebuilt = LlemError.from_payload(payload)
    assert type(rebuilt) is cls
    assert rebuilt.transient is original.transient
    assert rebuilt.to_payload() == original.to_payload()


def test_an_older_payload_without_transience_gets_the_class_default() -> None:
    old = {"type": "DockerUnavailableError", "message": "m", "fix_suggestion": "f"}
    assert LlemError.from_payload(old).transient
    assert not LlemError.from_payload({**old, "type": "DockerError"}).transient
