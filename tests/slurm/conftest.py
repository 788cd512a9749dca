"""A real single-node Slurm (`.ci/setup-slurm.sh`: 4 fake GPUs as GRES) and its clean-up.

Every test gets its own study name; its jobs are named `llem-<name>-...`, and
the fixture cancels any of them still in the queue when the test ends.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

#: A `command:` experiment that records the GPUs it saw and when it ran.
EXPERIMENT = """
import json, os, sys, time
t0 = time.time()
time.sleep(float(os.environ.get("SLEEP", "2")))
out = {"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "t0": t0, "t1": time.time()}
tmp = os.path.join(os.environ["LLEM_EXCHANGE_DIR"], "t.json")
json.dump(out, open(tmp, "w"))
os.replace(tmp, os.environ["LLEM_RESULT_PATH"])
"""


def squeue_jobs(prefix: str, *, active_only: bool = True) -> dict[str, tuple[str, str]]:
    """This user's jobs named `prefix...`: id -> (name, state)."""
    argv = ["squeue", "-h", "--me", "-o", "%i|%j|%T"]
    if not active_only:
        argv[1:1] = ["-t", "all"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    jobs = {}
    for line in proc.stdout.splitlines():
        job_id, name, state = line.strip().split("|")
        if name.startswith(prefix):
            jobs[job_id] = (name, state)
    return jobs


def running_jobs(prefix: str) -> int:
    """Experiments' jobs running now (not the study's shared-filesystem check job)."""
    jobs = squeue_jobs(prefix).values()
    return sum(state == "RUNNING" and not name.endswith("-check") for name, state in jobs)


@pytest.fixture(autouse=True)
def _absolute_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subprocesses started elsewhere (a job's folder, tmp_path) import what this one does."""
    path = os.environ.get("PYTHONPATH")
    if path:
        entries = [str(Path(p).resolve()) for p in path.split(os.pathsep) if p]
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(entries))


@pytest.fixture
def study_name() -> Iterator[str]:
    """A study name of this test alone; its jobs are cancelled at the end, whatever happened."""
    name = f"t{secrets.token_hex(3)}"
    yield name
    left = squeue_jobs(f"llem-{name}")
    if left:
        subprocess.run(["scancel", *left], timeout=30, check=False)
        deadline = time.monotonic() + 60
        while squeue_jobs(f"llem-{name}") and time.monotonic() < deadline:
            time.sleep(0.5)


def study_dict(name: str, n: int, **extra: Any) -> dict[str, Any]:
    """`n` experiments (x = 0..n-1) of EXPERIMENT on Slurm, with the local runner."""
    return {
        "name": name,
        "placement": "slurm",
        "runner": "local",
        "command": [sys.executable, "-c", EXPERIMENT],
        "stop_grace_s": 2,
        "grid": {"x": list(range(n))},
        **extra,
        "slurm": {"poll_interval_s": 0.5, "max_poll_interval_s": 2, **extra.get("slurm", {})},
    }


def write_study(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def run_argv(study_file: Path, out: Path, *more: str) -> list[str]:
    return [
        sys.executable, "-m", "llem_dispatch.cli", "run", str(study_file), "--plain",
        "--results", str(out), *more,
    ]  # fmt: skip


def records(out: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}


def journal(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]


def ledger(out: Path) -> list[dict[str, Any]]:
    """The placement's own journal of jobs: one line per submission and per end."""
    path = out / "slurm" / "jobs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
