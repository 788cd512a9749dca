"""Quiet windows and cores on the local runner: real processes, paused and pinned.

The experiments stamp their own progress and windows (`tests.quiet_study`); the
assertions read those stamps, never a sleep.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.quiet_study import check_quiet, records, write_cores_study, write_quiet_study

CLI = [sys.executable, "-m", "llem_dispatch.cli"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


@pytest.mark.parametrize("policy", ["pause", "run"])
def test_a_preparing_neighbour_makes_no_progress_inside_a_measured_window(
    tmp_path: Path, policy: str
) -> None:
    study = write_quiet_study(tmp_path, policy=policy)
    out = tmp_path / "out"
    proc = run_cli("run", str(study), "--runner", "local", "--results", str(out), "--plain")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_quiet(records(out), policy)


def _cores_study(tmp_path: Path, **extra: Any) -> Path:
    return write_cores_study(tmp_path, **extra)


def _cpu_list(text: str) -> set[int]:
    cores: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cores.update(range(int(low), int(high or low) + 1))
    return cores


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for 2 GPUs")
@pytest.mark.parametrize("prestart", [False, True])
def test_each_experiment_measures_on_its_own_gpus_cores(tmp_path: Path, prestart: bool) -> None:
    out = tmp_path / "out"
    study = _cores_study(tmp_path, prestart=prestart)
    proc = run_cli("run", str(study), "--runner", "local", "--results", str(out), "--plain")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert len(done) == 4
    by_gpu: dict[str, set[int]] = {}
    for record in done:
        data = record["result"]["data"]
        seen = _cpu_list(data["allowed"])
        assert seen == set(record["cpus"]), (seen, record["cpus"])
        assert len(seen) == 1
        assert data["omp"] == "1"
        by_gpu.setdefault(record["gpu_ids"][0], set()).update(seen)
    # One slot per GPU: the two GPUs' experiments never share a core.
    assert len(by_gpu) == 2
    first, second = by_gpu.values()
    assert first.isdisjoint(second)


def test_more_cores_per_gpu_than_the_host_has_is_a_located_error(tmp_path: Path) -> None:
    study = _cores_study(tmp_path, cpus_per_gpu=len(os.sched_getaffinity(0)) + 1)
    proc = run_cli("run", str(study), "--runner", "local", "--results", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = " ".join((proc.stdout + proc.stderr).split())
    assert re.search(r"study\.yaml:\d+: cpus_per_gpu", text), text
    assert f"this host gives us {len(os.sched_getaffinity(0))}" in text
    assert not (tmp_path / "o" / "records").exists()


def test_an_unknown_isolation_policy_is_a_located_error(tmp_path: Path) -> None:
    study = write_quiet_study(tmp_path, policy="freeze")
    proc = run_cli("run", str(study), "--runner", "local", "--results", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = " ".join((proc.stdout + proc.stderr).split())
    assert re.search(r"study\.yaml:\d+: prepare_during_measurement", text), text
    assert "'pause' or 'run'" in text
