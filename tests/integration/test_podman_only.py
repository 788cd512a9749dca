"""A Podman-only host: a `runner: podman` study never asks Docker for anything.

Its images are looked up and built on Podman 5.4's own API (.ci/setup-podman.sh),
while Docker, which this machine also runs, holds none of them: each test's image
has a unique name, made only in Podman, and the test checks Docker lacks it. The
CLI runs with DOCKER_HOST on a socket nobody listens on, so any Docker call would
fail. Then the same study on a host with neither engine: a clear error naming the
engine, its URL and what to do, and nothing left behind.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BUSYBOX_IMAGE, PODMAN_URL, ping
from tests.integration.test_cli import CLI

DOCKER_URL = "unix:///var/run/docker.sock"
RESULT = 'echo "{\\"ok\\": 1, \\"from\\": \\"$(cat /made-by)\\"}" > $LLEM_RESULT_PATH'

pytestmark = [pytest.mark.docker, pytest.mark.podman]


def _engine(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The docker CLI against one engine (Podman speaks its API too)."""
    return subprocess.run(
        ["docker", "--host", url, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _has_image(url: str, image: str) -> bool:
    return _engine(url, "image", "inspect", image).returncode == 0


def _containers(url: str, label: str) -> list[str]:
    return _engine(url, "ps", "-aq", "--filter", f"label={label}").stdout.split()


@pytest.fixture
def podman_only(tmp_path: Path) -> dict[str, str]:
    """The CLI's environment on a Podman-only host: Docker's socket answers nothing."""
    if (problem := ping(PODMAN_URL)) is not None:
        pytest.fail(f"Podman 5.4 (.ci/setup-podman.sh): {problem}")
    env = {k: v for k, v in os.environ.items() if k != "LLEM_RUNNER"}
    env["DOCKER_HOST"] = f"unix://{tmp_path}/no-docker.sock"
    env["LLEM_ENGINE_URL"] = PODMAN_URL
    env["COLUMNS"] = "200"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def unique_image() -> Iterator[str]:
    """A name no engine has yet; removed from Podman (and Docker, if it ever got there)."""
    name = f"llem-test/podman-only-{secrets.token_hex(4)}:1"
    assert not _has_image(PODMAN_URL, name)
    assert not _has_image(DOCKER_URL, name)
    yield name
    _engine(PODMAN_URL, "rmi", "-f", name)
    assert not _has_image(DOCKER_URL, name), "the image reached Docker"


@pytest.fixture
def no_leaks(test_labels: dict[str, str]) -> Iterator[str]:
    """The test's label; fails if a container carrying it is left on either engine."""
    label = f"llem.test.node={test_labels['llem.test.node']}"
    yield label
    for url in (PODMAN_URL, DOCKER_URL):
        left = _containers(url, label)
        if left:
            _engine(url, "rm", "-f", *left)
        assert not left, f"containers left behind on {url}: {left}"


def _study(tmp_path: Path, image: str, labels: dict[str, str], *, build: bool) -> Path:
    """A two-experiment CPU study on `runner: podman`, built from a context when `build`."""
    context = tmp_path / "ctx"
    context.mkdir(exist_ok=True)
    (context / "made-by").write_text("podman-build\n")
    # COPY only: RUN needs setrlimit, which the containerised Podman of CI cannot do.
    (context / "Dockerfile").write_text(
        "ARG BASE_IMAGE=busybox\nFROM ${BASE_IMAGE}\nCOPY made-by /made-by\n"
    )
    study = tmp_path / "study.yaml"
    lines = [
        "name: podman-only",
        "runner: podman",
        f"image: {image}",
        f"command: [sh, -c, {json.dumps(RESULT)}]",
        "network: none",
        "shm_size: 16m",
        "timeout_s: 60",
        "virtual_gpus: 1",
        "gpus_per_experiment: 0",
        f"labels: {json.dumps(labels)}",
        "grid: {i: [1, 2]}",
    ]
    if build:
        lines.append(f"build: {{context: ctx, args: {{BASE_IMAGE: {BUSYBOX_IMAGE}}}}}")
    study.write_text("\n".join(lines) + "\n")
    return study


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=300, check=False, env=env
    )


def _records(out: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]


def test_a_podman_study_builds_its_image_on_podman_with_docker_absent(
    tmp_path: Path,
    podman_only: dict[str, str],
    unique_image: str,
    test_labels: dict[str, str],
    no_leaks: str,
) -> None:
    study = _study(tmp_path, unique_image, test_labels, build=True)
    out = tmp_path / "out"
    proc = _cli(podman_only, "run", str(study), "--results", str(out), "--plain")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert f"building {unique_image}" in text
    assert f"on Podman at {PODMAN_URL}" in text
    assert _has_image(PODMAN_URL, unique_image)
    assert not _has_image(DOCKER_URL, unique_image), "built on Docker, not on Podman"
    done = _records(out)
    assert len(done) == 2
    for record in done:
        assert record["runner_type"] == "podman"
        assert record["image"] == unique_image
        assert record["image_digest"]
        assert record["result"]["data"] == {"ok": 1, "from": "podman-build"}  # type: ignore[index]
    # Run again: the image is there now, so nothing is built.
    again = _cli(podman_only, "run", str(study), "--results", str(out), "--plain", "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "building" not in again.stdout


def test_an_image_only_podman_has_runs_and_doctor_finds_it_there(
    tmp_path: Path,
    podman_only: dict[str, str],
    unique_image: str,
    test_labels: dict[str, str],
    no_leaks: str,
) -> None:
    tagged = _engine(PODMAN_URL, "tag", BUSYBOX_IMAGE, unique_image)
    assert tagged.returncode == 0, tagged.stderr
    assert not _has_image(DOCKER_URL, unique_image)
    study = _study(tmp_path, unique_image, test_labels, build=False)
    study.write_text(study.read_text().replace("$(cat /made-by)", "tagged"))
    out = tmp_path / "out"
    proc = _cli(podman_only, "run", str(study), "--results", str(out), "--plain")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["runner_type"] for r in _records(out)] == ["podman", "podman"]

    doctor = _cli(podman_only, "doctor", str(study))
    text = " ".join(doctor.stdout.split())
    assert f"PASS image {unique_image}: present on Podman" in text, text
    assert "PASS Podman API: Podman 5.4" in text
    assert "Docker daemon" not in text
    assert "NVIDIA container runtime" not in text


@pytest.mark.parametrize("build", [True, False], ids=["build", "image"])
def test_with_neither_engine_the_study_says_which_and_how_and_leaves_nothing(
    tmp_path: Path,
    podman_only: dict[str, str],
    unique_image: str,
    test_labels: dict[str, str],
    no_leaks: str,
    build: bool,
) -> None:
    dead = f"unix://{tmp_path}/no-podman.sock"
    env = {**podman_only, "LLEM_ENGINE_URL": dead}
    study = _study(tmp_path, unique_image, test_labels, build=build)
    out = tmp_path / "out"
    proc = _cli(env, "run", str(study), "--results", str(out), "--plain")
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, text
    assert f"Podman's API service does not answer at {dead}" in text
    assert "systemctl --user start podman.socket" in text
    assert "--engine-url" in text
    assert "Docker" not in text
    assert "Traceback" not in text
    assert not out.exists(), "a refused study writes no results"
    assert not _has_image(PODMAN_URL, unique_image)
    assert not _has_image(DOCKER_URL, unique_image)
