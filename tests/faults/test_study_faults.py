"""Whole-study faults through the CLI on the real daemon: SIGKILL, SIGINT, daemon restart.

After each: no container left, no result lost or duplicated, the journal says what
happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import BUSYBOX_IMAGE, REPO_ROOT, labelled_containers

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leaked_containers")]

CLI = [sys.executable, "-m", "llem_dispatch.cli"]
RESULT = (
    'echo "{\\"i\\": $I}" > "$LLEM_EXCHANGE_DIR/t"; mv "$LLEM_EXCHANGE_DIR/t" "$LLEM_RESULT_PATH"'
)
GET_I = 'I=$(sed "s/[^0-9]//g" "$LLEM_CONFIG_PATH"); '


def write_study(
    path: Path, labels: dict[str, str], script: str, *, n: int, gpus: int, extra: str = ""
) -> Path:
    label_lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in labels.items())
    path.write_text(f"""name: faults
image: {BUSYBOX_IMAGE}
command: ["sh", "-c", {json.dumps(GET_I + script)}]
virtual_gpus: {gpus}
gpus_per_experiment: 1
network: none
shm_size: 16m
labels:
{label_lines}
grid:
  i: {list(range(n))}
{extra}""")
    return path


def containers(label: str) -> list[str]:
    return labelled_containers(label)


def running(label: str) -> list[str]:
    return labelled_containers(label, running_only=True)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def records(out: Path) -> dict[str, dict[str, object]]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}


def blocked_logs(out: Path) -> list[Path]:
    return [
        p for p in (out / "exchange").glob("llem-*/container.log") if "blocked" in p.read_text()
    ]


def journal(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_sigkill_mid_study_then_resume_reaps_and_reruns_exactly_the_interrupted(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    # Experiments 0-1 finish at once; 2-5 block until the study's env says PHASE=2.
    script = (
        f'if [ "$I" -lt 2 ] || [ "$PHASE" = 2 ]; then {RESULT}; '
        'else echo "blocked $I"; sleep 600; fi'
    )
    study = write_study(
        tmp_path / "study.yaml", test_labels, script, n=6, gpus=6, extra="env: {PHASE: '1'}\n"
    )
    out = tmp_path / "out"
    label = f"llem.results_dir={out.resolve()}"
    proc = start_cli("run", str(study), "--results", str(out))
    try:
        wait_for(
            lambda: (
                len(records(out)) == 2 and len(running(label)) == 4 and len(blocked_logs(out)) == 4
            ),
            60,
            "2 records and 4 running containers that printed",
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    before = {p.name: p.read_bytes() for p in (out / "records").glob("*.json")}
    orphans = containers(label)
    assert len(orphans) == 4, "SIGKILL leaves the running containers behind"

    study.write_text(study.read_text().replace("PHASE: '1'", "PHASE: '2'"))
    resumed = subprocess.run(
        [*CLI, "run", str(study), "--results", str(out), "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "4 succeeded, 0 failed, 0 errors, 2 skipped" in resumed.stdout
    assert containers(label) == []
    # The orphans' logs were kept beside their exchange dirs.
    orphan_logs = [
        p for p in (out / "exchange").glob("llem-*/container.log") if "blocked" in p.read_text()
    ]
    assert len(orphan_logs) == 4
    assert all("blocked" in p.read_text() for p in orphan_logs)
    final = records(out)
    assert len(final) == 6
    assert sorted(int(r["config"]["i"]) for r in final.values()) == list(range(6))  # type: ignore[index]
    assert all(r["status"] == "succeeded" for r in final.values())
    for name, data in before.items():
        assert (out / "records" / name).read_bytes() == data, "earlier results untouched"
    events = [e["event"] for e in journal(out)]
    assert events.count("study_started") == 2
    assert events.count("succeeded") == 6
    assert events[-1] == "study_finished"


@pytest.mark.parametrize("force", [False, True], ids=["graceful", "second-sigint-forces"])
def test_sigint_stops_containers_records_interruption_exits_130(
    tmp_path: Path, test_labels: dict[str, str], force: bool
) -> None:
    if force:
        body = "trap '' TERM; while :; do sleep 0.2; done"  # ignores SIGTERM
        grace = 30
    else:
        body = "trap 'touch $LLEM_EXCHANGE_DIR/got-term; exit 0' TERM; while :; do sleep 0.2; done"
        grace = 5
    study = write_study(
        tmp_path / "study.yaml", test_labels, body, n=2, gpus=2, extra=f"stop_grace_s: {grace}\n"
    )
    out = tmp_path / "out"
    label = f"llem.results_dir={out.resolve()}"
    proc = start_cli("run", str(study), "--results", str(out))
    wait_for(lambda: len(running(label)) == 2, 60, "2 running containers")
    time.sleep(0.5)  # let the experiments install their TERM traps
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    if force:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=grace + 30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 130, output
    if force:
        assert elapsed < 10, f"forced stop took {elapsed:.1f}s (grace was {grace}s)"
    else:
        assert elapsed < grace + 5
        marks = list((out / "exchange").glob("llem-*/got-term"))
        assert len(marks) == 2, "each container got SIGTERM before any kill"
    assert containers(label) == []
    events = journal(out)
    interrupted = [e for e in events if e["event"] == "interrupted"]
    assert len(interrupted) == 1
    assert len(interrupted[0]["in_flight"]) == 2  # type: ignore[arg-type]
    assert "continue with --resume" in output


@pytest.fixture
def restart_daemon() -> Iterator[Callable[[], None]]:
    """Stops dockerd; the test restarts it (and the finalizer makes sure it is back)."""

    def stop() -> None:
        pid = int(Path("/var/run/docker.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), 60, "dockerd to exit")

    yield stop
    subprocess.run(
        ["bash", str(REPO_ROOT / ".ci/setup-docker.sh")],
        check=True,
        capture_output=True,
        timeout=180,
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/var/run/docker.pid").exists(),
    reason="stopping and restarting dockerd needs root and a local daemon",
)
def test_daemon_restart_mid_study_completes_without_duplicates(
    tmp_path: Path, test_labels: dict[str, str], restart_daemon: Callable[[], None]
) -> None:
    study = write_study(
        tmp_path / "study.yaml",
        test_labels,
        f"sleep 1; {RESULT}",
        n=8,
        gpus=2,
        extra="retries: 30\n",
    )
    out = tmp_path / "out"
    proc = start_cli("run", str(study), "--results", str(out))
    try:
        wait_for(lambda: len(records(out)) >= 2, 90, "the first results")
        restart_daemon()
        wait_for(
            lambda: any(e["event"] == "retried" for e in journal(out)),
            90,
            "a retry while the daemon is down",
        )
        subprocess.run(
            ["bash", str(REPO_ROOT / ".ci/setup-docker.sh")],
            check=True,
            capture_output=True,
            timeout=180,
        )
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)  # reaped, its pipes closed, even on failure
    assert proc.returncode == 0, output
    final = records(out)
    assert len(final) == 8
    assert all(r["status"] == "succeeded" for r in final.values())
    retried = [e for e in journal(out) if e["event"] == "retried"]
    print(
        f"\n{len(retried)} retries while the daemon was down:",
        sorted({(e["key"], e["error"]) for e in retried}),
    )
    assert retried
    assert {e["error"] for e in retried} <= {"DockerUnavailableError", "DockerError"}
    assert "DockerUnavailableError" in {e["error"] for e in retried}
    wait_for(
        lambda: containers(f"llem.results_dir={out.resolve()}") == [],
        30,
        "no container left after the daemon came back",
    )


def test_secret_never_in_inspect_env_or_any_log(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    token = "hf_FaultSuiteSecret_0123456789"
    # The experiment reads the secret file, prints it (worst case), and one of them fails.
    script = (
        'cat "$LLEM_SECRETS_PATH"; cat "$LLEM_SECRETS_PATH" >&2; sleep 1; '
        f'if [ "$I" = 1 ]; then exit 3; fi; {RESULT}'
    )
    study = write_study(tmp_path / "study.yaml", test_labels, script, n=2, gpus=2)
    out = tmp_path / "out"
    label = f"llem.results_dir={out.resolve()}"
    proc = start_cli(
        "run", str(study), "--results", str(out), "--json-logs", env={"HF_TOKEN": token}
    )
    inspected: list[str] = []
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        ids = running(label)
        if ids:
            inspected.append(
                subprocess.run(
                    ["docker", "inspect", *ids], capture_output=True, text=True, check=False
                ).stdout
            )
        time.sleep(0.2)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, output
    assert any('"Env"' in text for text in inspected), "inspected while running"
    assert all(token not in text for text in inspected)
    assert token not in output
    leaks = [p for p in out.rglob("*") if p.is_file() and token in p.read_text(errors="ignore")]
    assert leaks == []
    logs = list((out / "exchange").glob("llem-*/container.log"))
    assert logs, "the failed run kept its log"
    assert all("***" in p.read_text() for p in logs), "the printed secret was redacted"
