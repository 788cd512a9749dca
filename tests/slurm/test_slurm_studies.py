"""Studies on a real Slurm (one node, 4 fake GPUs as GRES) through `llem-dispatch run`."""

from __future__ import annotations

import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import anyio
import pytest

from llem_dispatch import SlurmPlacement
from tests.conftest import interrupt_and_wait
from tests.slurm.conftest import (
    journal,
    ledger,
    records,
    run_argv,
    running_jobs,
    squeue_jobs,
    study_dict,
    write_study,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

#: How long stopping a study may take, every step within its own bound.
STOP_BOUND_S = SlurmPlacement.stop_bound_s(2.0, None)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end before a start at the same time)."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, step in points:
        current += step
        best = max(best, current)
    return best


@pytest.mark.timeout(300)
async def test_mixed_study_uses_every_gpu_and_never_shares_one(
    tmp_path: Path, study_name: str
) -> None:
    data = study_dict(study_name, 6, env={"SLEEP": "3"}, gpus_field="n_gpus")
    data["grid"]["n_gpus"] = [1, 2]
    out = tmp_path / "out"
    with anyio.fail_after(240):
        done = await anyio.run_process(
            run_argv(write_study(tmp_path / "study.yaml", data), out), check=False
        )
    text = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, text
    assert "12 succeeded" in " ".join(text.split()), text
    found = records(out)
    assert len(found) == 12
    by_gpu: dict[str, list[tuple[float, float]]] = {}
    for record in found.values():
        assert record["status"] == "succeeded", record
        want = record["config"]["n_gpus"]
        seen = record["result"]["data"]["cvd"].split(",")
        # The job saw exactly its GPUs, and the record names them, its job and node.
        assert len(seen) == want, record
        assert record["gpu_ids"] == seen
        assert str(record["job_id"]).isdigit()
        assert record["node"]["hostname"]
        span = (record["result"]["data"]["t0"], record["result"]["data"]["t1"])
        for gpu in seen:
            by_gpu.setdefault(gpu, []).append(span)
    assert sorted(by_gpu) == ["0", "1", "2", "3"], "every GPU was used"
    for gpu, spans in by_gpu.items():
        assert max_overlap(spans) == 1, f"GPU {gpu} ran two experiments at once"
    every = [(r["result"]["data"]["t0"], r["result"]["data"]["t1"]) for r in found.values()]
    assert max_overlap(every) >= 3, "jobs should have run in parallel"
    assert len({r["job_id"] for r in found.values()}) == 12
    assert squeue_jobs(f"llem-{study_name}") == {}
    submitted = [e for e in ledger(out) if e["event"] == "submitted"]
    assert len(submitted) == 12


@pytest.mark.timeout(STOP_BOUND_S + 200)
async def test_ctrl_c_exits_130_and_leaves_no_job(tmp_path: Path, study_name: str) -> None:
    data = study_dict(study_name, 6, env={"SLEEP": "120"})
    out = tmp_path / "out"
    proc = subprocess.Popen(
        run_argv(write_study(tmp_path / "study.yaml", data), out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with anyio.fail_after(120):
            while running_jobs(f"llem-{study_name}") < 4:
                assert proc.poll() is None, f"the CLI exited with {proc.returncode}"
                await anyio.sleep(0.3)
        assert len(squeue_jobs(f"llem-{study_name}")) == 6, "2 more wait in the queue"
        took, text = interrupt_and_wait(proc, STOP_BOUND_S + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\nexit took {took:.1f}s")
    assert proc.returncode == 130, text
    assert "clean-up did not finish" not in text, text
    assert squeue_jobs(f"llem-{study_name}") == {}, "jobs left in the queue"
    assert journal(out)[-1]["event"] == "interrupted"
    assert records(out) == {}
    ended = Counter(e["state"] for e in ledger(out) if e["event"] == "ended")
    assert ended == {"CANCELLED": 6}


@pytest.mark.timeout(300)
async def test_driver_killed_then_resume_adopts_its_jobs(tmp_path: Path, study_name: str) -> None:
    data = study_dict(study_name, 6, env={"SLEEP": "10"})
    study_file = write_study(tmp_path / "study.yaml", data)
    out = tmp_path / "out"
    cli = run_argv(study_file, out)
    proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with anyio.fail_after(120):
            while running_jobs(f"llem-{study_name}") < 4 or len(ledger(out)) < 6:
                assert proc.poll() is None, f"the CLI exited with {proc.returncode}"
                await anyio.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # Its jobs outlive the driver: Slurm, not the driver, runs them.
    assert len(squeue_jobs(f"llem-{study_name}")) == 6

    with anyio.fail_after(200):
        again = await anyio.run_process([*cli, "--resume"], check=False)
    text = (again.stdout + again.stderr).decode()
    assert again.returncode == 0, text
    assert "6 succeeded" in " ".join(text.split()), text
    events = journal(out)
    assert [e["event"] for e in events].count("study_started") == 2
    succeeded = Counter(e["key"] for e in events if e["event"] == "succeeded")
    assert len(succeeded) == 6
    assert set(succeeded.values()) == {1}, "each result is written exactly once"
    assert len(records(out)) == 6
    submitted = Counter(e["config_hash"] for e in ledger(out) if e["event"] == "submitted")
    assert len(submitted) == 6
    assert set(submitted.values()) == {1}, "no job was submitted twice"
    assert {r["job_id"] for r in records(out).values()} == {
        e["job_id"] for e in ledger(out) if e["event"] == "submitted"
    }
    assert squeue_jobs(f"llem-{study_name}") == {}


@pytest.mark.timeout(180)
async def test_a_job_cancelled_from_outside_is_recorded_and_not_retried(
    tmp_path: Path, study_name: str
) -> None:
    data = study_dict(study_name, 2, env={"SLEEP": "120"}, retries=2)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        run_argv(write_study(tmp_path / "study.yaml", data), out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with anyio.fail_after(120):
            while running_jobs(f"llem-{study_name}") < 2:
                assert proc.poll() is None, f"the CLI exited with {proc.returncode}"
                await anyio.sleep(0.3)
        # Someone else cancels both jobs.
        subprocess.run(["scancel", *squeue_jobs(f"llem-{study_name}")], timeout=30, check=True)
        with anyio.fail_after(60):
            while proc.poll() is None:
                await anyio.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = proc.communicate()[0]
    assert proc.returncode != 0, text
    found = records(out)
    assert len(found) == 2
    for record in found.values():
        assert record["status"] == "error"
        assert record["error"]["type"] == "ClusterJobCancelledError", record["error"]
        assert record["attempts"] == 1, "a job cancelled from outside is not retried"
        assert record["job_id"]
    assert squeue_jobs(f"llem-{study_name}") == {}


@pytest.mark.timeout(300)
async def test_jobs_over_their_time_limits_are_timeouts_and_not_retried(
    tmp_path: Path, study_name: str
) -> None:
    # One study hits Slurm's limit (1 minute, enforced by slurmctld's periodic check),
    # one our own: the runner in the job stops the experiment at timeout_s.
    slurm_limit = study_dict(
        study_name + "a", 1, env={"SLEEP": "600"}, retries=2, slurm={"time_limit": "1"}
    )
    ours = study_dict(study_name + "b", 1, env={"SLEEP": "600"}, retries=2, timeout_s=3)
    runs = []
    async with anyio.create_task_group() as tg:
        for tag, data in (("a", slurm_limit), ("b", ours)):
            out = tmp_path / f"out-{tag}"
            runs.append(out)
            study_file = write_study(tmp_path / f"study-{tag}.yaml", data)
            tg.start_soon(lambda f=study_file, o=out: _run(f, o))
    for out in runs:
        (record,) = records(out).values()
        assert record["status"] == "error"
        assert record["error"]["type"] == "ExperimentTimeoutError", record["error"]
        assert record["attempts"] == 1, "timeouts are not retried by default"
    (slurm_record,) = records(runs[0]).values()
    assert "time limit" in slurm_record["error"]["message"]
    assert squeue_jobs(f"llem-{study_name}") == {}


async def _run(study_file: Path, out: Path) -> None:
    with anyio.fail_after(240):
        done = await anyio.run_process(run_argv(study_file, out), check=False)
    assert done.returncode != 0, (done.stdout + done.stderr).decode()


@pytest.mark.timeout(180)
async def test_results_dir_not_shared_is_a_clear_error_before_any_job(
    tmp_path: Path, study_name: str
) -> None:
    # The driver sees its results dir on a tmpfs of its own mount namespace, as a
    # login node's local disk: the jobs (started by slurmd) cannot see it.
    view = tmp_path / "private"
    view.mkdir()
    data = study_dict(study_name, 2, slurm={"shared_fs_timeout_s": 60})
    study_file = write_study(tmp_path / "study.yaml", data)
    inner = shlex.join(run_argv(study_file, view / "out"))
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f"mount -t tmpfs llemtest {shlex.quote(str(view))} && exec {inner}"]  # fmt: skip
    with anyio.fail_after(150):
        done = await anyio.run_process(argv, check=False)
    text = " ".join((done.stdout + done.stderr).decode().split())
    assert done.returncode != 0, text
    assert "not on a filesystem the nodes share" in text, text
    assert "ConfigError" in text or "shared filesystem" in text, text
    assert squeue_jobs(f"llem-{study_name}") == {}
    assert not (view / "out").exists(), "the driver's private view is gone with it"


@pytest.mark.timeout(120)
async def test_a_time_limit_over_the_partitions_fails_at_once(
    tmp_path: Path, study_name: str
) -> None:
    # The CI partition's MaxTime is 60 minutes: Slurm would keep such jobs pending forever.
    data = study_dict(study_name, 2, slurm={"time_limit": "2:00:00"})
    started = time.monotonic()
    with anyio.fail_after(90):
        done = await anyio.run_process(
            run_argv(write_study(tmp_path / "study.yaml", data), tmp_path / "out"), check=False
        )
    text = " ".join((done.stdout + done.stderr).decode().split())
    assert done.returncode != 0, text
    # Slurm 22.05 says PartitionConfig first, PartitionTimeLimit once it has looked again.
    assert "PartitionTimeLimit" in text or "PartitionConfig" in text, text
    assert "time_limit within the partition's MaxTime" in text
    assert time.monotonic() - started < 60
    assert squeue_jobs(f"llem-{study_name}") == {}


@pytest.mark.timeout(120)
async def test_doctor_checks_slurm_its_gpus_and_the_shared_filesystem(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "llem_dispatch.cli", "doctor", "--placement", "slurm"]
    with anyio.fail_after(100):
        done = await anyio.run_process(argv, cwd=tmp_path, check=False)
    text = " ".join(done.stdout.decode().split())
    assert "PASS Slurm: answers; partitions: debug* (1 node(s), up, 4 GPU(s) per node)" in text
    assert "PASS Slurm GPUs: 4 in the partition, at most 4 on one node" in text
    assert f"PASS shared filesystem: a job wrote into {tmp_path}" in text
    assert list(tmp_path.iterdir()) == [], "the probe's scratch dir is removed"


@pytest.mark.timeout(200)
async def test_a_node_failure_is_retried_by_our_policy(tmp_path: Path, study_name: str) -> None:
    host = socket.gethostname().split(".")[0]
    data = study_dict(study_name, 1, env={"SLEEP": "6"}, retries=1, gpus_per_experiment=1)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        run_argv(write_study(tmp_path / "study.yaml", data), out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with anyio.fail_after(120):
            while running_jobs(f"llem-{study_name}") < 1:
                assert proc.poll() is None, f"the CLI exited with {proc.returncode}"
                await anyio.sleep(0.3)
        # The node fails under the running job: Slurm ends it NODE_FAIL (no requeue).
        subprocess.run(
            ["scontrol", "update", f"NodeName={host}", "State=DOWN", "Reason=llem-test"],
            timeout=30,
            check=True,
        )
        with anyio.fail_after(150):
            while proc.poll() is None:
                await anyio.sleep(0.3)
    finally:
        # The node comes back by itself (ReturnToService=2); make sure of it.
        subprocess.run(
            ["scontrol", "update", f"NodeName={host}", "State=RESUME"], timeout=30, check=False
        )
        if proc.poll() is None:
            proc.kill()
    text = proc.communicate()[0]
    assert proc.returncode == 0, text
    (record,) = records(out).values()
    assert record["status"] == "succeeded"
    assert record["attempts"] == 2
    retried = [e for e in journal(out) if e["event"] == "retried"]
    assert [e["error"] for e in retried] == ["ClusterNodeLostError"]
    ended = [e["state"] for e in ledger(out) if e["event"] == "ended"]
    assert ended == ["NODE_FAIL", "COMPLETED"]


SLOW_EXIT = """
import atexit, time

# The interpreter's exit (CUDA teardown, in a real one) outlasts the work by 3 s.
atexit.register(time.sleep, 3)

def run(config):
    yield  # prepared
    yield  # measuring
    start = time.time()
    time.sleep(0.3)
    return {"work_start": start}
"""


@pytest.mark.timeout(300)
async def test_a_job_counts_its_cooldown_from_the_previous_jobs_done_on_its_gpu(
    tmp_path: Path, study_name: str
) -> None:
    """Two jobs, one after the other, on the same GPUs: the second's gate is the
    cooldown after the first's `done`, not after its (slow) exit; and the records
    carry the phases, as a local run's do. Each asks for all 4 GPUs: the driver takes
    the first's result from its outcome file while Slurm still lists it (exiting), so
    a 1-GPU second job could be given another, idle GPU."""
    (tmp_path / "slowexit.py").write_text(SLOW_EXIT)
    cooldown = 4.0
    data = study_dict(study_name, 2, experiment_gap_s=cooldown, max_concurrency=1)
    del data["command"]
    data.update(function="slowexit:run", gpus_per_experiment=4)
    out = tmp_path / "out"
    with anyio.fail_after(240):
        done = await anyio.run_process(
            run_argv(write_study(tmp_path / "study.yaml", data), out), check=False
        )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    first, second = sorted(records(out).values(), key=lambda r: r["started_at"])
    assert first["gpu_ids"] == second["gpu_ids"], "Slurm gave them different GPUs"

    def at(record: dict[str, object], name: str) -> float:
        return datetime.fromisoformat(str(record[name])).timestamp()

    for record in (first, second):
        for name in ("prepare_s", "gate_to_work_s", "work_started_at", "work_ended_at"):
            assert record[name] is not None, (name, record)
    assert at(first, "exited_at") - at(first, "work_ended_at") > 2.5, "the exit was not slow"
    assert at(second, "started_at") >= at(first, "work_ended_at") + cooldown - 0.05
    assert at(second, "started_at") < at(first, "exited_at") + cooldown
