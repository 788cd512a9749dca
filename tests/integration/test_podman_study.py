"""Studies on `runner: podman`, through Podman's Docker-compatible API (real Podman).

.ci/setup-podman.sh serves Podman 5.4 (Debian trixie's, in a privileged container)
and Podman 4.3 (bookworm's, on the host) on their own sockets; /etc/cdi holds the
made-up spec of four fake GPUs. `DOCKER_HOST` points the docker CLI the helpers
call at Podman for each test, so container checks look where the study ran.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiodocker
import pytest

from tests.conftest import (
    BUSYBOX_IMAGE,
    CDI_TEST_KIND,
    PODMAN43_URL,
    PODMAN_URL,
    PYTHON_IMAGE,
    cdi_test_uuids,
    fail_on_leaks,
    interrupt_and_wait,
    labelled_containers,
    ping,
)
from tests.integration.test_cdi import cdi_study, records
from tests.integration.test_cli import CLI, cli

DOCKER_URL = "unix:///var/run/docker.sock"

pytestmark = [pytest.mark.docker, pytest.mark.podman, pytest.mark.cdi]


@pytest.fixture(autouse=True)
def on_podman(monkeypatch: pytest.MonkeyPatch, test_labels: dict[str, str]) -> Iterator[str]:
    """The study's engine (and the helpers' docker CLI) is Podman 5.4; nothing left there."""
    monkeypatch.setenv("LLEM_ENGINE_URL", PODMAN_URL)
    monkeypatch.setenv("DOCKER_HOST", PODMAN_URL)
    yield PODMAN_URL
    fail_on_leaks(f"llem.test.node={test_labels['llem.test.node']}")


def podman_study(tmp_path: Path, labels: dict[str, str], **kwargs: object) -> Path:
    path = cdi_study(tmp_path, labels, gpus=cdi_test_uuids(), **kwargs)  # type: ignore[arg-type]
    path.write_text("runner: podman\n" + path.read_text())
    return path


def test_study_gives_each_container_exactly_its_gpus(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    """Mixed 1- and 2-GPU experiments on 4 CDI GPUs, on Podman: as on Docker."""
    out = tmp_path / "out"
    proc = cli("run", str(podman_study(tmp_path, test_labels)), "--results", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = records(out)
    assert len(done) == 8
    for record in done:
        seen = record["result"]["data"]["seen"].split()
        assert record["runner_type"] == "podman"
        assert record["gpu_request"] == "cdi"
        assert len(seen) == record["config"]["g"]
        assert sorted(seen) == sorted(record["gpu_ids"])
        assert record["image_digest"]
    # Resume: nothing is run again, no record rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")}
    again = cli("run", str(tmp_path / "study.yaml"), "--results", str(out), "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "8 skipped" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").glob("*.json")} == before


def test_sigkill_then_resume_reaps_on_podman_and_gives_each_result_once(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    """A dispatcher killed outright leaves containers in Podman; --resume removes them
    there (the engine of the study's kind, not Docker's) and runs what was lost."""
    study = podman_study(tmp_path, test_labels, n=4)
    quick = study.read_text()
    study.write_text(quick.replace("sleep 1; ", "sleep 600; "))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*CLI, "run", str(study), "--results", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    label = f"llem.results_dir={out.resolve()}"
    try:
        deadline = time.monotonic() + 90
        while len(labelled_containers(label, running_only=True)) < 2:
            assert time.monotonic() < deadline, "containers never started on Podman"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    orphans = labelled_containers(label)
    assert len(orphans) >= 2, "SIGKILL left the containers running (as it must)"
    # `reap` looks at Docker unless told the engine: there it finds none of these.
    mine = ("--dry-run", "--results", str(out))
    assert "no orphaned" in cli("reap", *mine, "--engine-url", DOCKER_URL).stdout
    listed = cli("reap", *mine, "--engine-url", PODMAN_URL)
    assert f"would remove {len(orphans)} container(s)" in listed.stdout, listed.stdout
    study.write_text(quick)  # what is run again now finishes at once
    resumed = cli("run", str(study), "--results", str(out), "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not set(orphans) & set(labelled_containers(label)), "orphans outlived the resume"
    done = records(out)
    assert len(done) == 4
    assert len({r["config_hash"] for r in done}) == 4


def test_ctrl_c_stops_the_study_and_leaves_nothing_on_podman(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    study = podman_study(tmp_path, test_labels, n=4)
    study.write_text(study.read_text().replace("sleep 1; ", "sleep 600; "))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*CLI, "run", str(study), "--results", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    label = f"llem.results_dir={out.resolve()}"
    try:
        deadline = time.monotonic() + 90
        while len(labelled_containers(label, running_only=True)) < 2:
            assert time.monotonic() < deadline, "containers never started on Podman"
            time.sleep(0.2)
        took, output = interrupt_and_wait(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130, output
    assert labelled_containers(label) == [], "Ctrl-C left containers in Podman"
    assert took < 30, f"Ctrl-C took {took:.1f}s"


def test_gpu_study_on_podman_43_is_refused_before_anything_runs(
    tmp_path: Path, test_labels: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if (problem := ping(PODMAN43_URL)) is not None:
        pytest.fail(f"Podman 4.3 (.ci/setup-podman.sh): {problem}")
    monkeypatch.setenv("DOCKER_HOST", PODMAN43_URL)
    out = tmp_path / "out"
    study = podman_study(tmp_path, test_labels)
    proc = cli("run", str(study), "--results", str(out), "--engine-url", PODMAN43_URL)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Podman 4.3" in text
    assert "ignores device requests before 5.4" in text
    assert "Upgrade Podman to 5.4" in text
    assert "Traceback" not in text
    assert not list((out / "records").glob("*.json"))
    assert labelled_containers(f"llem.test.node={test_labels['llem.test.node']}") == []
    # A study without GPUs runs there: the refusal is about GPUs, not about 4.3.
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    plain = cpu / "study.yaml"
    plain.write_text(
        f"name: cpu\nrunner: podman\nimage: {BUSYBOX_IMAGE}\nnetwork: none\n"
        'command: ["sh", "-c", "echo \\"{\\\\\\"ok\\\\\\": 1}\\" > $LLEM_RESULT_PATH"]\n'
        f"labels: {json.dumps(test_labels)}\ngrid:\n  i: [1, 2]\n"
    )
    ran = cli("run", str(plain), "--results", str(cpu / "out"), "--engine-url", PODMAN43_URL)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "2 succeeded" in ran.stdout


async def test_podman_43_really_ignores_cdi_device_requests(test_labels: dict[str, str]) -> None:
    """Why the refusal exists: 4.3 accepts a CDI request and gives the container nothing."""
    if (problem := ping(PODMAN43_URL)) is not None:
        pytest.fail(f"Podman 4.3 (.ci/setup-podman.sh): {problem}")
    uuid = cdi_test_uuids()[0]
    async with aiodocker.Docker(url=PODMAN43_URL) as engine:
        container = await engine.containers.create(
            {
                "Image": BUSYBOX_IMAGE,
                "Cmd": ["sh", "-c", "env | grep LLEM_CDI_GPU_ || echo none"],
                "Labels": test_labels,
                "HostConfig": {
                    "NetworkMode": "none",
                    "DeviceRequests": [{"Driver": "cdi", "DeviceIDs": [f"{CDI_TEST_KIND}={uuid}"]}],
                },
            }
        )
        try:
            await container.start()
            assert (await container.wait(timeout=60))["StatusCode"] == 0
            output = "".join(await container.log(stdout=True, stderr=True))
        finally:
            await container.delete(force=True)
    assert output.strip() == "none"


def test_no_podman_at_the_socket_says_how_to_start_it(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    out = tmp_path / "out"
    nowhere = f"unix://{tmp_path}/podman.sock"
    proc = cli(
        "run",
        str(podman_study(tmp_path, test_labels)),
        "--results",
        str(out),
        "--engine-url",
        nowhere,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert f"Podman's API service does not answer at {nowhere}" in text
    assert "podman.socket" in text
    assert "Docker" not in text


def test_prestart_on_podman_holds_containers_at_their_gate(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    """Prestart through Podman: the next container starts early and waits at its gate
    until the GPU's holder has exited; no GPU is ever in two running experiments."""
    (tmp_path / "work.py").write_text(
        "import os, time\n"
        "def run(config):\n"
        "    start = time.time()\n"
        "    time.sleep(1.5)\n"
        "    return {'start': start, 'end': time.time(),\n"
        "            'seen': ''.join(v for k, v in os.environ.items()\n"
        "                            if k.startswith('LLEM_CDI_GPU_'))}\n"
    )
    study = tmp_path / "study.yaml"
    study.write_text(
        f"name: prestart\nrunner: podman\nimage: {PYTHON_IMAGE}\nfunction: work:run\n"
        "mount_study_dir: true\nprestart: true\ngpus_per_experiment: 1\n"
        f"gpus: {json.dumps(cdi_test_uuids()[:2])}\n"
        f"cdi_kind: {CDI_TEST_KIND}\nnetwork: none\nshm_size: 16m\ntimeout_s: 120\n"
        f"labels: {json.dumps(test_labels)}\ngrid:\n  i: [1, 2, 3, 4, 5, 6]\n"
    )
    out = tmp_path / "out"
    proc = cli("run", str(study), "--results", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = records(out)
    assert len(done) == 6
    assert any(r["prestarted"] for r in done), "no container was prestarted"
    spans = sorted(
        (r["gpu_ids"][0], r["result"]["data"]["start"], r["result"]["data"]["end"]) for r in done
    )
    for (gpu_a, _, end_a), (gpu_b, start_b, _) in itertools.pairwise(spans):
        if gpu_a == gpu_b:
            assert start_b >= end_a, f"{gpu_a} was used by two experiments at once"
    assert all(r["result"]["data"]["seen"] == r["gpu_ids"][0] for r in done)


def test_doctor_names_each_podman_its_version_and_cdi() -> None:
    new = " ".join(cli("doctor", "--engine-url", PODMAN_URL).stdout.split())
    assert "PASS Podman API: Podman 5.4" in new, new
    assert "PASS Podman GPU requests: device requests honoured" in new
    assert f"{CDI_TEST_KIND}: 4 device(s)" in new
    old = " ".join(cli("doctor", "--engine-url", PODMAN43_URL).stdout.split())
    assert "PASS Podman API: Podman 4.3" in old, old
    assert "WARN Podman GPU requests: 4.3.1 ignores device requests" in old


def _sleep_study(tmp_path: Path, labels: dict[str, str], runner: str, timeout_s: int) -> Path:
    """One experiment that sleeps past `timeout_s` on `runner`'s engine."""
    study = tmp_path / "study.yaml"
    study.write_text(
        f"name: slow\nrunner: {runner}\nimage: {BUSYBOX_IMAGE}\n"
        'command: ["sleep", "600"]\nnetwork: none\nshm_size: 16m\n'
        f"timeout_s: {timeout_s}\nlabels: {json.dumps(labels)}\ngrid:\n  i: [1]\n"
    )
    return study


def test_a_podman_timeout_is_recorded_as_podmans_with_its_url(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    """The record of a Podman run that timed out names Podman's class, and the engine
    with the URL it ran on: nothing in it says Docker."""
    out = tmp_path / "out"
    study = _sleep_study(tmp_path, test_labels, "podman", timeout_s=2)
    proc = cli("run", str(study), "--results", str(out), timeout=120)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    [record] = records(out)
    assert record["status"] == "error"
    assert record["error"]["type"] == "PodmanTimeoutError"
    assert record["engine"] == f"Podman at {PODMAN_URL}"
    assert record["runner_type"] == "podman"
    assert "Docker" not in json.dumps(record["error"])


def test_a_docker_run_is_recorded_with_docker_and_its_url(
    tmp_path: Path, test_labels: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLEM_ENGINE_URL", DOCKER_URL)
    monkeypatch.setenv("DOCKER_HOST", DOCKER_URL)
    out = tmp_path / "out"
    study = _sleep_study(tmp_path, test_labels, "docker", timeout_s=2)
    try:
        proc = cli("run", str(study), "--results", str(out), timeout=120)
    finally:
        fail_on_leaks(f"llem.test.node={test_labels['llem.test.node']}")
        monkeypatch.setenv("DOCKER_HOST", PODMAN_URL)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    [record] = records(out)
    assert record["error"]["type"] == "DockerTimeoutError"
    assert record["engine"] == f"Docker at {DOCKER_URL}"
    assert record["runner_type"] == "docker"
