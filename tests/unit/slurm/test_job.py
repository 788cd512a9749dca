"""The job entry without Slurm: it reads its spec, runs the runner, writes its files."""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llem_dispatch.runners import LocalRunner
from llem_dispatch.slurm import job
from llem_dispatch.slurm.attempts import read_json

SCRIPT = (
    "import json, os, time\n"
    "def mark(name):\n"
    "    with open(os.environ['LLEM_MARKS_PATH'], 'a') as f:\n"
    "        f.write(json.dumps({'mark': name, 't': time.time()}) + '\\n')\n"
    "mark('start'); mark('ready'); mark('work')\n"
    "json.dump({'cvd': os.environ['CUDA_VISIBLE_DEVICES']}, "
    "open(os.environ['LLEM_RESULT_PATH'], 'w'))\n"
    "mark('done')\n"
)


def local_runner(host: Any) -> LocalRunner:
    """The pickled factory the job calls (a module-level function, as a study's is)."""
    assert host.virtual
    return LocalRunner([sys.executable, "-c", SCRIPT])


def failing_runner(host: Any) -> LocalRunner:
    return LocalRunner([sys.executable, "-c", "raise SystemExit(3)"])


def _folder(tmp_path: Path, factory: Any, **spec: Any) -> Path:
    (tmp_path / "factory.pkl").write_bytes(pickle.dumps(factory))
    folder = tmp_path / "attempt"
    folder.mkdir()
    job.write_json(
        folder / job.SPEC_FILE,
        {
            "config": {"x": 1},
            "config_hash": "0123456789abcdef",
            "factory": str(tmp_path / "factory.pkl"),
            "cooldown_s": 0,
            "settle": None,
            "driver_host": "elsewhere",
            **spec,
        },
    )
    return folder


@pytest.fixture(autouse=True)
def _slurm_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLEM_GPU_STATE_DIR", str(tmp_path / "gpu-state"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)


def test_the_job_runs_on_the_gpus_slurm_gave_it(tmp_path: Path) -> None:
    folder = _folder(tmp_path, local_runner)
    assert job.main([str(folder)]) == 0
    started = read_json(folder / job.STARTED_FILE)
    assert started is not None
    assert started["gpu_ids"] == ["1", "3"]
    assert started["job_id"] == "77"
    outcome = read_json(folder / job.OUTCOME_FILE)
    assert outcome is not None
    assert outcome["kind"] == "result"
    assert outcome["result"]["data"] == {"cvd": "1,3"}
    report = outcome["info"]["report"]
    assert report["process_id"]
    # The helper's marks made it into the report: phases on Slurm as on this host.
    assert report["work_ended_at"] is not None
    assert report["prepare_s"] is not None


def test_a_runner_error_travels_as_data_and_the_job_fails(tmp_path: Path) -> None:
    folder = _folder(tmp_path, failing_runner)
    assert job.main([str(folder)]) == 1
    outcome = read_json(folder / job.OUTCOME_FILE)
    assert outcome is not None
    assert outcome["kind"] == "error"
    assert outcome["error"]["type"] == "ExperimentExitError"


def test_the_cooldown_is_kept_in_the_job_before_the_workload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(job.time, "sleep", slept.append)
    folder = _folder(tmp_path, local_runner, cooldown_s=7.5)
    assert job.main([str(folder)]) == 0
    assert slept == [7.5]  # nothing recorded on these GPUs yet: the whole cooldown
    # The next job on them counts its cooldown from that one's `done` mark.
    done = job.last_work_ended(("1", "3"), {})
    assert done is not None
    slept.clear()
    (tmp_path / "b").mkdir()
    assert job.main([str(_folder(tmp_path / "b", local_runner, cooldown_s=7.5))]) == 0
    assert len(slept) == 1
    assert slept[0] < 7.5
    assert slept[0] == pytest.approx(7.5 - (time.time() - done), abs=1.0)
    # Long ago: no wait at all.
    job.record_work_ended(("1", "3"), {}, time.time() - 100)
    slept.clear()
    job._settle({"cooldown_s": 7.5}, ("1", "3"), {}, virtual=True)
    assert slept == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    slept.clear()
    job._settle({"cooldown_s": 7.5}, (), {}, virtual=True)
    assert slept == [], "a job without GPUs has nothing to cool down"
