"""The live display: per-GPU lines and counts, rendered by rich's recording console."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Console

from llem_dispatch.cli import LiveDisplay, ProgressState, record_row
from llem_dispatch.dispatch import (
    ErrorInfo,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentStarted,
    RunRecord,
)


def render(state: ProgressState) -> str:
    console = Console(record=True, width=120, force_terminal=True, color_system=None)
    console.print(LiveDisplay(state))
    return console.export_text()


def record(key: str, gpus: list[str], status: str = "succeeded") -> RunRecord:
    now = datetime.now(UTC)
    return RunRecord(
        config_hash=key[:16],
        config={},
        status=status,  # type: ignore[arg-type]
        gpu_ids=gpus,
        queued_at=now,
        started_at=now,
        ended_at=now,
        tags={"key": key},
        error=ErrorInfo(type="DockerOOMError", message="m") if status == "error" else None,
    )


def test_display_shows_a_line_per_gpu_with_what_runs_there() -> None:
    state = ProgressState(total=5, gpu_ids=["0", "1", "2", "3"])
    assert state.apply(ExperimentStarted("a" * 16, ("0",), 1, "cid", None, {"key": "exp_a"}))
    state.apply(ExperimentStarted("b" * 16, ("2", "3"), 1, "cid", None, {"key": "exp_b"}))
    text = render(state)
    lines = text.splitlines()
    gpu_lines = {line.split()[1]: line for line in lines if line.startswith("GPU ")}
    assert set(gpu_lines) == {"0", "1", "2", "3"}
    assert "exp_a" in gpu_lines["0"]
    assert "idle" in gpu_lines["1"]
    assert "exp_b" in gpu_lines["2"]
    assert "exp_b" in gpu_lines["3"]
    assert "2 running" in text
    assert "3 queued" in text


def test_display_counts_done_and_failed_and_frees_gpus() -> None:
    state = ProgressState(total=3, gpu_ids=["0", "1"])
    state.apply(ExperimentStarted("a" * 16, ("0",), 1, None, 1, {"key": "exp_a"}))
    state.apply(ExperimentStarted("b" * 16, ("1",), 1, None, 2, {"key": "exp_b"}))
    assert state.apply(ExperimentFinished(record("exp_a", ["0"]))) is not None
    line = state.apply(ExperimentFailed(record("exp_b", ["1"], "error")))
    assert line is not None
    assert "DockerOOMError" in line
    text = render(state)
    assert "1 done · 1 failed · 0 running · 1 queued" in text
    assert "2/3" in text
    assert "failed: exp_b: DockerOOMError" in text
    assert text.count("idle") == 2


def test_record_row_flattens_params_and_scalar_results() -> None:
    row = record_row(
        {
            "key": "h_c1",
            "config_hash": "h",
            "cycle": 1,
            "status": "succeeded",
            "config": {"size": 64, "opts": {"a": 1}},
            "started_at": "2026-01-01T00:00:00+00:00",
            "ended_at": "2026-01-01T00:00:02.5+00:00",
            "gpu_ids": ["0", "3"],
            "result": {"data": {"gflops": 1.5, "times": [1, 2]}},
        }
    )
    assert row["param.size"] == 64
    assert row["param.opts"] == '{"a": 1}'
    assert row["duration_s"] == 2.5
    assert row["gpu_ids"] == "0,3"
    assert row["result.gflops"] == 1.5
    assert "result.times" not in row
