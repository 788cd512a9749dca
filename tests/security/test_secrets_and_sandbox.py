"""Secrets left by a crash, and a sandbox widened without a word."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from llem_dispatch import Study, run_study
from llem_dispatch.reap import reap
from llem_dispatch.study import make_runner, resolve_runner
from llem_dispatch.testing import FakeRunner
from tests.conftest import BUSYBOX_IMAGE, labelled_containers


async def test_resume_removes_secrets_a_killed_run_left(tmp_path: Path) -> None:
    study = Study.model_validate({"grid": {"x": [1, 2]}})
    out = tmp_path / "o"
    await run_study(study, out, runner=FakeRunner())
    # As a SIGKILLed run leaves a kept exchange dir: secrets in plaintext (0600).
    kept = out / "exchange" / "llem-killed"
    kept.mkdir()
    secrets = kept / ".llem-secrets.json"
    secrets.write_text('{"HF_TOKEN": "hf_abcdefgh"}')
    secrets.chmod(0o600)
    (out / "records" / next(iter((out / "records").iterdir())).name).unlink()
    with capture_logs() as logs:
        await run_study(study, out, runner=FakeRunner(), resume=True)
    assert not secrets.exists()
    assert kept.is_dir(), "the kept exchange dir itself stays (its logs are evidence)"
    assert any(e["event"] == "stale_secrets_removed" for e in logs)


@pytest.mark.docker
async def test_reap_removes_the_secrets_of_the_containers_it_reaps(
    tmp_path: Path, test_labels: dict[str, str], no_leaked_containers: None
) -> None:
    exchange = tmp_path / "llem-orphan"
    exchange.mkdir()
    secrets = exchange / ".llem-secrets.json"
    secrets.write_text('{"HF_TOKEN": "hf_abcdefgh"}')
    label = f"llem.test.node={test_labels['llem.test.node']}"
    labels = {
        "llem.managed": "1",
        "llem.host": socket.gethostname(),
        "llem.pid": "999999",  # an owner that is gone
        "llem.pid_start": "1",
        "llem.exchange_dir": str(exchange),
        "llem.results_dir": str(tmp_path / "results"),
        **test_labels,
    }
    argv = ["docker", "run", "-d", "--network", "none"]
    for key, value in labels.items():
        argv += ["--label", f"{key}={value}"]
    subprocess.run([*argv, BUSYBOX_IMAGE, "sleep", "300"], check=True, capture_output=True)
    found = await reap(results_dir=tmp_path / "results", logs_dir=tmp_path / "logs")
    assert len(found) == 1
    assert labelled_containers(label) == []
    assert not secrets.exists()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"cap_add": ["SYS_ADMIN"]}, "cap_add: SYS_ADMIN"),
        ({"network": "host"}, "network: host"),
        ({"user": "0:0"}, "user: '0:0'"),
        ({"env": {"LD_PRELOAD": "/x.so"}}, "env: LD_PRELOAD"),
    ],
)
def test_each_widening_of_the_sandbox_is_warned(
    tmp_path: Path, fields: dict[str, object], expected: str
) -> None:
    study = Study.model_validate({"image": "img:1", "grid": {"x": [1]}, **fields})
    with capture_logs() as logs:
        make_runner(study, resolve_runner("docker", study), study_dir=tmp_path)
    widened = [e["widening"] for e in logs if e["event"] == "sandbox_widened"]
    assert len(widened) == 1
    assert widened[0].startswith(expected)


def test_a_default_study_widens_nothing(tmp_path: Path) -> None:
    study = Study.model_validate({"image": "img:1", "grid": {"x": [1]}, "user": "1000:1000"})
    with capture_logs() as logs:
        make_runner(study, resolve_runner("docker", study), study_dir=tmp_path)
    assert not [e for e in logs if e["event"] == "sandbox_widened"]
