"""The llem-dispatch command, driven in a subprocess against the real daemon."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from llem_dispatch._docker import engine_version, run_probe, runtimes
from llem_dispatch._labels import LABEL_SESSION, SESSION_ID
from llem_dispatch.errors import DockerImagePullError
from tests.conftest import BUSYBOX_IMAGE, labelled_containers, run_in_pty

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leaked_containers")]

CLI = [sys.executable, "-m", "llem_dispatch.cli"]


def cli(
    *args: str, timeout: float = 120, cwd: Path | None = None, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        cwd=cwd,
    )


def study_file(
    tmp_path: Path, labels: dict[str, str], script: str, *, n: int = 4, extra: str = ""
) -> Path:
    label_lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in labels.items())
    path = tmp_path / "study.yaml"
    path.write_text(f"""name: clitest
image: {BUSYBOX_IMAGE}
command: ["sh", "-c", {json.dumps(script)}]
virtual_gpus: 2
gpus_per_experiment: 1
network: none
shm_size: 16m
timeout_s: 60
labels:
{label_lines}
grid:
  i: {list(range(n))}
{extra}""")
    return path


OK_SCRIPT = 'echo "{\\"value\\": $(cat $LLEM_CONFIG_PATH | sed "s/[^0-9]//g")}" > $LLEM_RESULT_PATH'


def test_run_success_then_results_csv(tmp_path: Path, test_labels: dict[str, str]) -> None:
    study = study_file(tmp_path, test_labels, OK_SCRIPT)
    out = tmp_path / "out"
    proc = cli("run", str(study), "--results", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 succeeded, 0 failed" in proc.stdout
    assert len(list((out / "records").glob("*.json"))) == 4
    table = cli("results", str(out), "--format", "csv")
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader(io.StringIO(table.stdout)))
    assert len(rows) == 4
    assert {r["status"] for r in rows} == {"succeeded"}
    assert sorted(int(r["param.i"]) for r in rows) == [0, 1, 2, 3]
    assert all(r["result.value"] == r["param.i"] for r in rows)
    assert {r["gpu_ids"] for r in rows} <= {"0", "1"}
    assert all(r["image_digest"].startswith("sha256:") for r in rows)
    jsonl = cli("results", str(out), "--format", "jsonl")
    assert len(jsonl.stdout.splitlines()) == 4
    pretty = cli("results", str(out))
    assert "succeeded" in pretty.stdout


def test_run_with_failures_exits_1_with_summary(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    script = (
        'if grep -q \'"i":1\' $LLEM_CONFIG_PATH; then echo "disk on fire" >&2; exit 4; '
        f"fi; {OK_SCRIPT}"
    )
    study = study_file(tmp_path, test_labels, script, n=3)
    out = tmp_path / "out"
    proc = cli("run", str(study), "--results", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 succeeded, 0 failed, 1 errors" in proc.stdout
    assert "failed experiments" in proc.stdout
    assert "DockerContainerError" in proc.stdout
    assert "container log" in proc.stdout  # the fix suggestion
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    bad = [r for r in records if r["status"] != "succeeded"]
    assert len(bad) == 1
    kept = Path(bad[0]["exchange_dir"])
    assert kept.is_dir()
    assert "disk on fire" in (kept / "container.log").read_text()
    # Resume runs only the failed one again (it fails again, still one record).
    again = cli("run", str(study), "--results", str(out), "--resume")
    assert again.returncode == 1
    assert "2 skipped" in again.stdout
    assert len(list((out / "records").glob("*.json"))) == 3


def test_dry_run_prints_plan_and_runs_nothing(tmp_path: Path, test_labels: dict[str, str]) -> None:
    study = study_file(tmp_path, test_labels, OK_SCRIPT, n=3)
    proc = cli("run", str(study), "--dry-run", "--results", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "3 experiments (dry run)" in proc.stdout
    assert '"Image": "' + BUSYBOX_IMAGE in proc.stdout
    assert '"Target": "/run/llem"' in proc.stdout
    assert "LLEM_CONFIG_PATH=/run/llem/" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_bad_study_exits_2_listing_problems(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("image: 'UPPER CASE'\ntimeout_s: -1\ngrid: {x: []}\nbogus: 1\n")
    proc = cli("run", str(path))
    assert proc.returncode == 2
    assert "4 problem(s)" in proc.stderr
    assert "bogus: unknown field" in proc.stderr
    usage = cli("run", str(path), "--max-concurrency", "0")
    assert usage.returncode == 2


def test_too_many_gpus_is_usage_error(tmp_path: Path, test_labels: dict[str, str]) -> None:
    study = study_file(tmp_path, test_labels, OK_SCRIPT, n=1)
    proc = cli(
        "run", str(study), "--virtual-gpus", "1", "--results", str(tmp_path / "o"), timeout=60
    )
    assert proc.returncode == 0
    text = study.read_text().replace("gpus_per_experiment: 1", "gpus_per_experiment: 3")
    study.write_text(text)
    proc = cli("run", str(study), "--results", str(tmp_path / "o2"))
    assert proc.returncode == 2
    assert "asked for 3 GPUs" in proc.stderr


def test_reap_removes_containers_of_a_killed_dispatcher(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    study = study_file(tmp_path, test_labels, "echo working; sleep 600", n=2)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*CLI, "run", str(study), "--results", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    label = f"llem.results_dir={out.resolve()}"
    try:
        deadline = time.monotonic() + 60

        def printed() -> int:
            logs = (out / "exchange").glob("llem-*/container.log")
            return sum("working" in p.read_text() for p in logs)

        while len(labelled_containers(label)) < 2 or printed() < 2:
            assert time.monotonic() < deadline, "containers never started"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    orphans = labelled_containers(label)
    assert len(orphans) == 2, "SIGKILL left the containers running (as it must)"
    dry = cli("reap", "--dry-run")
    assert dry.returncode == 0
    assert "would remove" in dry.stdout
    assert len(labelled_containers(label)) == 2
    reaped = cli("reap", cwd=tmp_path)
    assert reaped.returncode == 0, reaped.stderr
    assert "removed 2 container(s)" in reaped.stdout
    assert labelled_containers(label) == []
    kept_logs = list((out / "exchange").glob("llem-*/container*.log"))
    assert len(kept_logs) == 2
    assert all("working" in p.read_text() for p in kept_logs)


def test_live_display_under_a_pseudo_terminal(tmp_path: Path, test_labels: dict[str, str]) -> None:
    study = study_file(tmp_path, test_labels, f"sleep 1; {OK_SCRIPT}", n=4)
    returncode, screen = run_in_pty(
        "run", str(study), "--results", str(tmp_path / "out"), columns=120, lines=40
    )
    assert returncode == 0, screen[-2000:]
    assert "GPU 0" in screen
    assert "GPU 1" in screen
    assert "_c1" in screen, "a GPU line named the experiment running on it"
    assert "queued" in screen
    assert "4 succeeded" in screen


def test_doctor_reports_daemon_and_study_image(tmp_path: Path, test_labels: dict[str, str]) -> None:
    study = study_file(tmp_path, test_labels, OK_SCRIPT, n=1)
    proc = cli("doctor", str(study))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS Docker daemon" in proc.stdout
    assert f"PASS image {BUSYBOX_IMAGE}: present" in proc.stdout
    assert "probe container" in proc.stdout
    missing = study.read_text().replace(BUSYBOX_IMAGE, "llem-test/absent:0")
    study.write_text(missing)
    proc = cli("doctor", str(study))
    assert proc.returncode == 1
    assert "FAIL image llem-test/absent:0: missing" in proc.stdout


def test_doctor_probe_runs_through_the_docker_edge_and_leaves_nothing() -> None:
    """What doctor asks the daemon: version, runtimes, a probe run removed after itself."""

    async def ask() -> None:
        server, api = await engine_version()
        assert server
        assert api.count(".") == 1
        assert "runc" in await runtimes()
        await run_probe(BUSYBOX_IMAGE)
        with pytest.raises(DockerImagePullError):
            await run_probe("llem-test/absent:0")

    anyio.run(ask)
    assert labelled_containers(f"{LABEL_SESSION}={SESSION_ID}") == []


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("runner", ["docker", "local"])
def test_quickstart_example_runs(tmp_path: Path, runner: str) -> None:
    """The README's first command: the quickstart sweep, 12 experiments on 4 virtual GPUs."""
    from tests.conftest import PYTHON_IMAGE

    env = {**os.environ, "LLEM_BASE_IMAGE": PYTHON_IMAGE}
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *CLI,
            "run",
            str(REPO / "examples/quickstart/study.yaml"),
            "--results",
            str(out),
            "--runner",
            runner,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "12 succeeded, 0 failed" in proc.stdout
    rows = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert len(rows) == 12
    data = [r["result"]["data"] for r in rows]
    assert all(d["gflops"] > 0 and d["time_per_op_ms"] > 0 for d in data)
    assert {d["gpu_ids"] for d in data} <= {"0", "1", "2", "3"}
    assert all(d["energy_source"].startswith(("nvml", "unavailable")) for d in data)
    # What a person reads next: the table fits 100 columns, the report is written.
    table = cli("results", str(out), columns=100)
    assert table.returncode == 0, table.stderr
    assert max(len(line) for line in table.stdout.splitlines()) <= 100, table.stdout
    assert "gflops" in table.stdout
    assert "repeats=3" in table.stdout
    if importlib.util.find_spec("plotly") is not None:
        report = cli("report", str(out))
        assert report.returncode == 0, report.stderr
        assert (out / "report.html").stat().st_size > 1_000_000  # plotly.js inlined
    subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=llem.results_dir={out.resolve()}"], check=False
    )


def test_auto_detected_runner_is_recorded_as_auto(tmp_path: Path) -> None:
    # No daemon at DOCKER_HOST: auto-detection picks the local runner, and every
    # record must say the choice was `auto`, not `explicit`.
    (tmp_path / "exp.py").write_text("def run(config):\n    return {'x': config['x']}\n")
    study = tmp_path / "study.yaml"
    study.write_text("name: auto\nfunction: exp:run\nvirtual_gpus: 1\ngrid: {x: [1, 2]}\n")
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock",
        "LLEM_RUNNER": "",
    }
    out = tmp_path / "out"
    proc = subprocess.run(
        [*CLI, "run", str(study), "--results", str(out), "--plain"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "falling back to the local subprocess runner" in proc.stdout + proc.stderr
    assert json.loads((out / "study.json").read_text())["runner_source"] == "auto"
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert len(records) == 2
    assert {r["result"]["runner"]["runner_source"] for r in records} == {"auto"}


def test_results_naming_a_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "exp.py").write_text("def run(config):\n    return {}\n")
    study = tmp_path / "study.yaml"
    study.write_text("name: f\nfunction: exp:run\nvirtual_gpus: 1\ngrid: {x: [1]}\n")
    target = tmp_path / "a-file"
    target.write_text("mine")
    proc = cli("run", str(study), "--results", str(target), "--runner", "local", "--plain")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is a file, not a directory" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert target.read_text() == "mine"
