"""translate_docker_error over the texts and return codes the docker CLI and subprocess produce.

llenergymeasure's callers pass (returncode, stderr, image) and read the error's
attributes; the samples below are the messages as Docker's own sources print them
(docker/cli `cli/command/container/create.go`, `cli/command/cli.go`; moby
`distribution/errors.go`, `errdefs`, `client/errors.go`), not invented ones.
"""

from __future__ import annotations

import pytest

from llem_dispatch import (
    DockerContainerError,
    DockerError,
    DockerGPUAccessError,
    DockerImagePullError,
    DockerOOMError,
    DockerPermissionError,
    DockerTimeoutError,
    DockerUnavailableError,
    EnginePermissionError,
    EngineUnavailableError,
    ExperimentExitError,
    ExperimentOOMError,
    ExperimentStartError,
    ExperimentTimeoutError,
    ImageError,
    RunnerError,
    translate_docker_error,
)

SOCKET_DENIED = (
    "Got permission denied while trying to connect to the Docker daemon socket at "
    'unix:///var/run/docker.sock: Get "http://%2Fvar%2Frun%2Fdocker.sock/v1.24/containers/json":'
    " dial unix /var/run/docker.sock: connect: permission denied"
)


@pytest.mark.parametrize(
    ("returncode", "stderr", "expected"),
    [
        (1, SOCKET_DENIED, DockerPermissionError),
        (
            1,
            "permission denied while trying to connect to the Docker daemon",
            DockerPermissionError,
        ),
        (
            1,
            "permission denied while trying to connect to the Docker API at "
            "unix:///var/run/docker.sock",
            DockerPermissionError,
        ),
        (
            125,
            "Unable to find image 'llem-missing:1' locally\ndocker: Error response from daemon: "
            "pull access denied for llem-missing, repository does not exist or may require "
            "'docker login': denied: requested access to the resource is denied.",
            DockerImagePullError,
        ),
        (
            125,
            "docker: Error response from daemon: manifest for llem/x:9 not found: manifest "
            "unknown: manifest unknown.",
            DockerImagePullError,
        ),
        (1, "Error response from daemon: No such image: llem/x:9", DockerImagePullError),
        (
            125,
            'docker: Error response from daemon: failed to resolve reference "docker.io/llem/'
            'x:9": docker.io/llem/x:9: not found.',
            DockerImagePullError,
        ),
        (
            1,
            "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker "
            "daemon running?",
            DockerUnavailableError,
        ),
        (
            125,
            'docker: Error response from daemon: could not select device driver "nvidia" '
            "with capabilities: [[gpu]].",
            DockerGPUAccessError,
        ),
        (124, "", DockerTimeoutError),  # timeout(1)
        (-9, "", DockerTimeoutError),  # subprocess.run(timeout=...) killed it
        (-15, "", DockerTimeoutError),
        (137, "", DockerOOMError),  # as before: 137 without evidence
        (1, "Traceback (most recent call last):\nValueError: bad", DockerContainerError),
    ],
)
def test_real_messages_are_classified(returncode: int, stderr: str, expected: type) -> None:
    error = translate_docker_error(returncode, stderr, "llem/x:9")
    assert type(error) is expected
    assert error.exit_code == returncode
    assert error.fix_suggestion


def test_permission_fix_names_the_docker_group() -> None:
    error = translate_docker_error(1, SOCKET_DENIED, "img:1")
    assert "usermod -aG docker" in error.fix_suggestion


def test_pull_fix_names_the_image() -> None:
    error = translate_docker_error(125, "Unable to find image 'img:1' locally", "img:1")
    assert "docker pull img:1" in error.fix_suggestion


@pytest.mark.parametrize("stderr", ["", None])
def test_no_stderr_gives_no_snippet(stderr: str | None) -> None:
    assert translate_docker_error(1, stderr, "img:1").stderr_snippet is None


def test_snippet_is_the_last_lines() -> None:
    text = "\n".join(f"line {i}" for i in range(30))
    error = translate_docker_error(1, text, "img:1")
    assert error.stderr_snippet is not None
    assert error.stderr_snippet.splitlines() == [f"line {i}" for i in range(10, 30)]


@pytest.mark.parametrize(
    ("returncode", "stderr", "neutral"),
    [
        (1, SOCKET_DENIED, EnginePermissionError),
        (125, "Unable to find image 'img:1' locally", ImageError),
        (
            1,
            "Cannot connect to the Docker daemon. Is the docker daemon running?",
            EngineUnavailableError,
        ),
        (
            125,
            'could not select device driver "nvidia" with capabilities: [[gpu]]',
            ExperimentStartError,
        ),
        (124, "", ExperimentTimeoutError),
        (137, "", ExperimentOOMError),
        (1, "ValueError: bad", ExperimentExitError),
    ],
)
def test_translated_errors_are_docker_errors_and_their_neutral_class(
    returncode: int, stderr: str, neutral: type[RunnerError]
) -> None:
    # llenergymeasure catches the Docker classes; a caller handling any runner, the neutral.
    error = translate_docker_error(returncode, stderr, "img:1")
    assert isinstance(error, DockerError)
    assert isinstance(error, neutral)
