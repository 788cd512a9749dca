"""A Docker daemon that answers `version` and `ps` but hangs on container calls.

A hung daemon cannot be made on demand, so a fault proxy in front of the real one
(tests/faults/docker_proxy.py) stalls chosen endpoints, as the 20.10 libnetwork
deadlock does for `start`, `inspect` and `rm` of the containers it holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from llem_dispatch import DockerRunner, DockerTimeoutError, GpuPool, Study, run_study
from llem_dispatch._docker import ApiDeadlines
from llem_dispatch.dispatch import Event, ExperimentRetried, RetryPolicy
from llem_dispatch.reap import reap
from tests.conftest import BUSYBOX_IMAGE, labelled_containers
from tests.faults.docker_proxy import DockerFaultProxy

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leaked_containers")]

START = r"^/v[\d.]+/containers/[^/]+/start"
DELETE = r"^/v[\d.]+/containers/[^/?]+(\?|$)"
FAST = ApiDeadlines(create=5, attach=5, start=2, inspect=3, kill=3, stop=3, delete=2)
RESULT = (
    'echo "{\\"ok\\": 1}" > "$LLEM_EXCHANGE_DIR/t"; mv "$LLEM_EXCHANGE_DIR/t" "$LLEM_RESULT_PATH"'
)


def runner(proxy: DockerFaultProxy, labels: dict[str, str], script: str, **kw: Any) -> DockerRunner:
    return DockerRunner(
        BUSYBOX_IMAGE,
        command=["sh", "-c", script],
        network="none",
        shm_size="16m",
        labels=labels,
        docker_host=proxy.url,
        api_deadlines=FAST,
        gpu_passthrough=False,
        **kw,
    )


async def test_stalled_start_is_retried_and_the_study_completes_once_lifted(
    docker_proxy: DockerFaultProxy, test_labels: dict[str, str], tmp_path: Path
) -> None:
    docker_proxy.stall("POST", START)
    retried: list[str] = []

    def on_event(event: Event) -> None:
        if isinstance(event, ExperimentRetried):
            retried.append(event.error)
            docker_proxy.release()  # the daemon recovers after the first verdict

    study = Study.model_validate({"name": "hung", "grid": {"i": [0, 1, 2, 3]}})
    started = time.monotonic()
    with anyio.fail_after(60):
        summary = await run_study(
            study,
            tmp_path / "out",
            runner=runner(docker_proxy, test_labels, RESULT),
            pool=GpuPool.virtual_devices(2),
            on_event=on_event,
            retry_policy=RetryPolicy(max_attempts=4, base_delay_s=0.1, jitter=False),
            reap_orphans=False,
        )
    assert "DockerDaemonHungError" in retried
    assert summary.succeeded == 4, summary
    lines = (tmp_path / "out" / "journal.jsonl").read_text().splitlines()
    journal = [json.loads(line) for line in lines]
    done = [e["key"] for e in journal if e["event"] == "succeeded"]
    assert len(done) == 4
    assert sorted(done) == sorted(set(done)), "each result exactly once"
    took = time.monotonic() - started
    print(f"\nstalled start: {len(retried)} retries, study done in {took:.1f}s")


async def test_cleanup_after_a_timeout_is_bounded_when_delete_hangs(
    docker_proxy: DockerFaultProxy, test_labels: dict[str, str], exchange_base: Path
) -> None:
    docker_proxy.stall("DELETE", DELETE)
    r = runner(docker_proxy, test_labels, "sleep 60", timeout=2, exchange_base=exchange_base)
    started = time.monotonic()
    with pytest.raises(DockerTimeoutError):
        async with r:
            await r.run({"x": 1})
    elapsed = time.monotonic() - started
    # timeout 2 + kill (prompt) + delete deadline 2 + the close's short retry (5).
    assert elapsed < 2 + 3 + 2 + 5 + 3, elapsed
    label = f"llem.test.node={test_labels['llem.test.node']}"
    left = labelled_containers(label)
    assert len(left) == 1, "the stuck removal left it for reap"
    docker_proxy.release()
    # Its owner (this process) lives on, so `reap` would not touch it: remove it by hand.
    subprocess.run(["docker", "rm", "-f", *left], check=True, capture_output=True)
    print(f"\ntimeout + hung delete: ended in {elapsed:.1f}s")


async def test_reap_is_bounded_and_reports_when_delete_hangs(
    docker_proxy: DockerFaultProxy, test_labels: dict[str, str], tmp_path: Path
) -> None:
    label = f"llem.test.node={test_labels['llem.test.node']}"
    argv = ["docker", "run", "-d", "--network", "none", "--label", "llem.managed=1"]
    for key, value in {
        **test_labels,
        "llem.host": os.uname().nodename,
        "llem.pid": "999999",
        "llem.pid_start": "1",
        "llem.results_dir": str(tmp_path / "r"),
    }.items():
        argv += ["--label", f"{key}={value}"]
    subprocess.run([*argv, BUSYBOX_IMAGE, "sleep", "300"], check=True, capture_output=True)
    docker_proxy.stall("DELETE", DELETE)
    started = time.monotonic()
    found = await reap(
        results_dir=tmp_path / "r",
        logs_dir=tmp_path / "logs",
        docker_host=docker_proxy.url,
        deadlines=FAST,
    )
    elapsed = time.monotonic() - started
    assert found == [], "skipped, not claimed as removed"
    assert elapsed < 10, elapsed
    assert len(labelled_containers(label)) == 1
    docker_proxy.release()
    found = await reap(results_dir=tmp_path / "r", logs_dir=tmp_path / "logs", deadlines=FAST)
    assert len(found) == 1
    assert labelled_containers(label) == []


def _study_file(tmp_path: Path, labels: dict[str, str], script: str, extra: str = "") -> Path:
    label_lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in labels.items())
    path = tmp_path / "study.yaml"
    path.write_text(f"""name: hungcli
image: {BUSYBOX_IMAGE}
command: ["sh", "-c", {json.dumps(script)}]
virtual_gpus: 2
gpus_per_experiment: 1
network: none
shm_size: 16m
stop_grace_s: 2
docker_deadlines: {{create: 5, attach: 5, start: 2, inspect: 3, kill: 3, stop: 3, delete: 2}}
labels:
{label_lines}
grid:
  i: [0, 1, 2, 3, 4, 5]
{extra}""")
    return path


def _cli(proxy: DockerFaultProxy, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DOCKER_HOST": proxy.url, "PYTHONUNBUFFERED": "1", "COLUMNS": "250"}
    return subprocess.Popen(
        [sys.executable, "-m", "llem_dispatch.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def test_start_hung_for_good_ends_the_study_with_exit_1_and_records_kept(
    docker_proxy: DockerFaultProxy, test_labels: dict[str, str], tmp_path: Path
) -> None:
    # The first two run; then the daemon hangs on every `start`.
    script = 'if [ "$(cat $LLEM_CONFIG_PATH)" != "" ]; then sleep 0.5; fi; ' + RESULT
    study = _study_file(tmp_path, test_labels, script, "retries: 1\nmax_concurrency: 2\n")
    out = tmp_path / "out"
    proc = _cli(docker_proxy, "run", str(study), "--results", str(out), "--plain")
    deadline = time.monotonic() + 60
    while docker_proxy.seen("POST", START) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    docker_proxy.stall("POST", START)
    started = time.monotonic()
    output, _ = proc.communicate(timeout=90)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1, output
    assert "stopped early" in output, output
    assert "sudo systemctl restart docker" in output, output  # the error's own fix
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    statuses = sorted(r["status"] for r in records)
    assert statuses.count("succeeded") >= 2, statuses
    assert any((r.get("error") or {}).get("type") == "DockerDaemonHungError" for r in records)
    # Two attempts of a 2 s start deadline and their clean-up, for the last in flight.
    assert elapsed < 40, elapsed
    docker_proxy.release()
    print(f"\nhung for good: exit 1 after {elapsed:.1f}s, records {statuses}")


def test_sigterm_while_start_hangs_exits_within_grace_plus_5s(
    docker_proxy: DockerFaultProxy, test_labels: dict[str, str], tmp_path: Path
) -> None:
    docker_proxy.stall("POST", START)
    study = _study_file(tmp_path, test_labels, RESULT)
    proc = _cli(docker_proxy, "run", str(study), "--results", str(tmp_path / "out"), "--plain")
    deadline = time.monotonic() + 60
    while docker_proxy.held() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert docker_proxy.held() >= 1, "no start reached the proxy"
    docker_proxy.stall("DELETE", DELETE)  # and removal hangs too
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    elapsed = time.monotonic() - sent
    assert proc.returncode == 130, output
    assert elapsed <= 2 + 5 + 1, f"exited {elapsed:.1f}s after SIGTERM: {output}"
    docker_proxy.release()
    # What the stuck daemon kept is left for `reap`, which removes it once it answers.
    label = f"llem.test.node={test_labels['llem.test.node']}"
    left = labelled_containers(label)
    assert left, "removal was stalled: something must be left for reap"
    assert "reap" in output
    found = anyio.run(lambda: reap(results_dir=tmp_path / "out", logs_dir=tmp_path / "logs"))
    assert sorted(r.container_id[:12] for r in found) == sorted(left)
    print(f"\nSIGTERM during a hung start: exit 130 after {elapsed:.1f}s")
