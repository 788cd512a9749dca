"""Quiet windows and cores with containers: the engine's pause (cgroup freezer), and
`CpusetCpus`, on Docker and on Podman 5.4 (real engines).

The same study as the local runner's (`tests.quiet_study`): its experiments stamp
their own prepare progress and windows, read back from the records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PODMAN_URL, PYTHON_IMAGE, fail_on_leaks
from tests.integration.test_cli import cli
from tests.quiet_study import check_quiet, records, write_cores_study, write_quiet_study

pytestmark = [pytest.mark.docker]

ENGINES = [
    pytest.param("docker", id="docker"),
    pytest.param("podman", id="podman", marks=pytest.mark.podman),
]


@pytest.fixture
def engine(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, test_labels: dict[str, str]
) -> Iterator[str]:
    """The runner kind; on Podman the study's engine and the docker CLI point there."""
    kind: str = request.param
    if kind == "podman":
        monkeypatch.setenv("LLEM_ENGINE_URL", PODMAN_URL)
        monkeypatch.setenv("DOCKER_HOST", PODMAN_URL)
    yield kind
    fail_on_leaks(f"llem.test.node={test_labels['llem.test.node']}")


def _container_header(kind: str, labels: dict[str, str]) -> dict[str, object]:
    return {
        "runner": kind,
        "image": PYTHON_IMAGE,
        "mount_study_dir": True,
        "network": "none",
        "shm_size": "16m",
        "labels": labels,
    }


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
@pytest.mark.parametrize("policy", ["pause", "run"])
def test_a_preparing_container_is_frozen_for_each_measured_window(
    tmp_path: Path, engine: str, policy: str, test_labels: dict[str, str]
) -> None:
    study = write_quiet_study(
        tmp_path, policy=policy, header=_container_header(engine, test_labels)
    )
    out = tmp_path / "out"
    proc = cli("run", str(study), "--results", str(out), "--plain", timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = records(out)
    assert {r["runner_type"] for r in done} == {engine}
    check_quiet(done, policy)


@pytest.mark.parametrize("engine", ENGINES, indirect=True)
def test_each_container_measures_on_its_gpus_cores(
    tmp_path: Path, engine: str, test_labels: dict[str, str]
) -> None:
    write_cores_study(tmp_path, **_container_header(engine, test_labels))
    out = tmp_path / "out"
    proc = cli("run", str(tmp_path / "study.yaml"), "--results", str(out), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert len(done) == 4
    slots: dict[str, set[str]] = {}
    for record in done:
        data = record["result"]["data"]
        assert data["allowed"] == ",".join(str(c) for c in record["cpus"])
        assert data["omp"] == "1"
        slots.setdefault(record["gpu_ids"][0], set()).add(data["allowed"])
    assert len(slots) == 2
    assert all(len(seen) == 1 for seen in slots.values())
    first, second = (next(iter(s)) for s in slots.values())
    assert first != second
