"""The Slurm placement's pure parts: settings, options, how a job's end is classified."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from llem_dispatch import SlurmPlacement, SlurmSettings, Study
from llem_dispatch.dispatch import RecordDraft
from llem_dispatch.errors import (
    ClusterJobCancelledError,
    ClusterNodeLostError,
    ExperimentExitError,
    ExperimentOOMError,
    ExperimentTimeoutError,
)
from llem_dispatch.models import ExperimentFailure, ExperimentResult
from llem_dispatch.runners.protocol import utcnow
from llem_dispatch.slurm.attempts import Attempt, Ledger, outcome_of
from llem_dispatch.slurm.commands import gpu_count, time_s
from llem_dispatch.slurm.steps import step_state


@pytest.mark.parametrize(
    ("gres", "count"),
    [("gpu:4", 4), ("gpu:a100:8(S:0-1)", 8), ("gpu:2,shard:4", 2), ("(null)", 0), ("", 0)],
)
def test_gpu_count_reads_sinfo_gres(gres: str, count: int) -> None:
    assert gpu_count(gres) == count


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5", 300), ("1:30", 90), ("2:00:00", 7200), ("1-00", 86400), ("1-2:3:4", 93784)],
)
def test_slurm_times_in_seconds(value: str, seconds: float) -> None:
    assert time_s(value) == seconds
    SlurmSettings(time_limit=value)


def test_settings_refuse_what_would_disagree_with_us() -> None:
    with pytest.raises(ValidationError, match="not a Slurm time"):
        SlurmSettings(time_limit="2h")
    with pytest.raises(ValidationError, match="must not set --gpus"):
        SlurmSettings(sbatch_args=["--gpus=8"])
    with pytest.raises(ValidationError, match="extra"):
        SlurmSettings.model_validate({"partiton": "gpu"})


def test_study_takes_a_slurm_block_only_with_the_slurm_placement() -> None:
    base: dict[str, Any] = {"name": "s", "command": ["true"], "grid": {"x": [1]}}
    study = Study.model_validate({**base, "placement": "slurm", "slurm": {"partition": "gpu"}})
    settings = study.placement_settings()
    assert isinstance(settings, SlurmSettings)
    assert settings.partition == "gpu"
    default = Study.model_validate({**base, "placement": "slurm"}).placement_settings()
    assert isinstance(default, SlurmSettings)
    with pytest.raises(ValidationError, match="add `placement: slurm`"):
        Study.model_validate({**base, "slurm": {"partition": "gpu"}})


def _factory(host: Any) -> Any:
    raise AssertionError("not called here")


def test_job_options_follow_the_settings_and_the_study_timeout(tmp_path: Path) -> None:
    settings = SlurmSettings(
        partition="gpu", account="lab", qos="high", gpu_option="gres", sbatch_args=["--exclusive"]
    )
    placement = SlurmPlacement(_factory, tmp_path, settings=settings, timeout_s=600)
    argv = placement.sbatch_options(2, "llem-s-abc")
    assert argv[:2] == ["--job-name=llem-s-abc", "--gres=gpu:2"]
    assert "--partition=gpu" in argv
    assert "--account=lab" in argv
    # 600 s of experiment plus the margin, in whole minutes.
    assert "--time=12" in argv
    assert argv[-1] == "--exclusive"
    # Our retry policy, not Slurm's requeue, runs a job of a failed node again.
    assert "--no-requeue" in argv
    step = placement.sbatch_options(1, "n", step=True)
    assert not any(a.startswith(("--partition", "--account", "--qos", "--no-re")) for a in step)
    assert "--gpus=0" not in placement.sbatch_options(0, "n")
    assert SlurmPlacement(_factory, tmp_path).jobs.time_limit() is None


def test_cores_per_gpu_become_the_jobs_cpus_and_a_steps_binding(tmp_path: Path) -> None:
    placement = SlurmPlacement(_factory, tmp_path, cpus_per_gpu=4)
    assert "--cpus-per-task=8" in placement.sbatch_options(2, "n")
    assert "--cpu-bind" not in " ".join(placement.sbatch_options(2, "n"))
    step = placement.sbatch_options(1, "n", step=True)
    assert "--cpus-per-task=4" in step
    assert "--cpu-bind=cores" in step
    # A CPU-only job asks for none; `slurm.cpus_per_task` wins over the study's.
    assert not any(a.startswith("--cpus") for a in placement.sbatch_options(0, "n"))
    mine = SlurmPlacement(
        _factory, tmp_path, settings=SlurmSettings(cpus_per_task=3), cpus_per_gpu=4
    )
    assert "--cpus-per-task=3" in mine.sbatch_options(2, "n")


def _attempt(tmp_path: Path, outcome: dict[str, Any] | None = None) -> Attempt:
    attempt = Attempt.new(tmp_path, "abcd")
    attempt.job_id = "42"
    if outcome is not None:
        (attempt.folder / "outcome.json").write_text(json.dumps(outcome))
    (attempt.folder / "slurm-42.out").write_text("line 1\nslurmstepd: error: it ended\n")
    return attempt


def _draft() -> RecordDraft:
    return RecordDraft(config_hash="abcd", config={}, queued_at=utcnow())


@pytest.mark.parametrize(
    ("state", "error", "transient"),
    [
        ("NODE_FAIL", ClusterNodeLostError, True),
        ("PREEMPTED", ClusterNodeLostError, True),
        ("BOOT_FAIL", ClusterNodeLostError, True),
        ("TIMEOUT", ExperimentTimeoutError, False),
        ("OUT_OF_MEMORY", ExperimentOOMError, False),
        ("CANCELLED", ClusterJobCancelledError, False),
        ("FAILED", ExperimentExitError, False),
    ],
)
def test_slurm_ends_map_to_neutral_errors(
    tmp_path: Path, state: str, error: type[Exception], transient: bool
) -> None:
    attempt = _attempt(tmp_path)
    with pytest.raises(error) as caught:
        outcome_of(attempt, state, _draft(), ExperimentResult)
    assert getattr(caught.value, "transient", None) is transient
    assert "42" in str(caught.value)
    if state in {"TIMEOUT", "FAILED"}:
        assert "it ended" in str(caught.value)


def test_the_job_outcome_file_decides_a_completed_job(tmp_path: Path) -> None:
    result = {"config_hash": "abcd", "data": {"x": 1}, "runner": {"runner_type": "local"}}
    report = {"process_id": 7, "prepare_s": 1.5, "work_ended_at": "2026-12-07T10:00:00Z"}
    ok = _attempt(tmp_path, {"kind": "result", "result": result, "info": {"report": report}})
    draft = _draft()
    assert isinstance(outcome_of(ok, "COMPLETED", draft, ExperimentResult), ExperimentResult)
    assert draft.process_id == 7
    # The phases travel in the one attempt report, as from a local run.
    assert draft.prepare_s == 1.5
    assert draft.work_ended_at is not None
    failure = {"config_hash": "abcd", "type": "ValueError", "message": "bad"}
    failed = _attempt(tmp_path, {"kind": "failure", "failure": failure, "info": {}})
    assert isinstance(outcome_of(failed, "FAILED", _draft(), ExperimentResult), ExperimentFailure)
    error = ExperimentTimeoutError("ran 3s", config_hash="abcd").to_payload()
    timed = _attempt(tmp_path, {"kind": "error", "error": error, "info": {}})
    with pytest.raises(ExperimentTimeoutError, match="Slurm job 42"):
        outcome_of(timed, "FAILED", _draft(), ExperimentResult)


def test_our_own_cancel_is_not_cancelled_from_outside(tmp_path: Path) -> None:
    attempt = _attempt(tmp_path, {"kind": "cancelled", "info": {}})
    attempt.cancelled_by_us = True
    with pytest.raises(ClusterJobCancelledError, match="SIGTERM"):
        outcome_of(attempt, "CANCELLED", _draft(), ExperimentResult)


def test_the_ledger_names_jobs_whose_end_was_never_read(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "jobs.jsonl")
    first, second = _attempt(tmp_path), _attempt(tmp_path)
    second.job_id = "43"
    ledger.submitted(first, 1)
    ledger.submitted(second, 2)
    ledger.ended(first, "COMPLETED")
    with ledger.path.open("a") as fh:
        fh.write('{"event": "subm')  # a kill mid-write
    (open_job,) = ledger.open_jobs()
    assert (open_job.job_id, open_job.folder) == ("43", second.folder)


@pytest.mark.parametrize(
    ("code", "said", "state"),
    [
        (0, "", "COMPLETED"),
        (1, "srun: error: task 0: Exited with exit code 1", "FAILED"),
        (1, "slurmstepd: *** STEP 5.0 CANCELLED AT 2026 DUE TO TIME LIMIT ***", "TIMEOUT"),
        (1, "slurmstepd: *** STEP 5.0 ON n1 CANCELLED AT 2026 ***", "CANCELLED"),
        (137, "Detected 1 oom-kill event(s) in StepId=5.0", "OUT_OF_MEMORY"),
    ],
)
def test_step_ends_from_srun(code: int, said: str, state: str) -> None:
    assert step_state(code, said) == state
