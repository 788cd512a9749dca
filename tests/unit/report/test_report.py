"""Results for people: the table's columns and width, load_results, the report's data.

Results dirs come from the quickstart study run by a FakeRunner
(`make_quickstart_results`), or are written by hand where exact times matter.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llem_dispatch.cli import app
from llem_dispatch.cli.progress import resumed_count
from llem_dispatch.errors import ConfigError
from llem_dispatch.report import (
    build_report_data,
    build_timeline,
    format_value,
    read_results,
    select_columns,
)
from llem_dispatch.report.data import flat_row
from llem_dispatch.report.timeline import EXPERIMENT_KINDS
from llem_dispatch.study import Study, expand_study, load_study
from tests.conftest import QUICKSTART_STUDY, make_quickstart_results

pandas = pytest.importorskip("pandas", reason="the `data` extra is not installed")


def cli(*args: str, columns: int = 100) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})


@pytest.fixture
async def quickstart(tmp_path: Path) -> Path:
    return await make_quickstart_results(tmp_path / "qs")


@pytest.fixture
async def troubled(tmp_path: Path) -> Path:
    return await make_quickstart_results(tmp_path / "qs-trouble", trouble=True, gap_s=0.02)


# -- the results table ----------------------------------------------------------------


def test_results_table_fits_100_columns_for_the_quickstart(quickstart: Path) -> None:
    result = cli("results", str(quickstart))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 100, result.output
    header = next(line for line in lines if line.lstrip().startswith("key"))
    assert header.split() == [
        "key",
        "status",
        "GPU",
        "duration",
        "size",
        "dtype",
        "batch",
        "gflops",
        "time_per_op_ms",
    ]
    assert "repeats=3" in result.output  # the constant parameter, once, above the table
    rows = [line.split() for line in lines if re.match(r"^\s*[0-9a-f]{7}\s", line)]
    assert len(rows) == 12, "one line per experiment, none wrapped"
    assert all(row[1] == "succeeded" for row in rows)
    digits = [n.replace(".", "").lstrip("0") for n in re.findall(r"\d+\.\d+", result.output)]
    assert digits
    assert max(len(d) for d in digits) <= 4, "floats are rounded to 4 significant digits"
    assert not re.search(r"[0-9a-f]{16}", result.output), "keys are short"


def test_results_table_names_failures_by_class_and_still_fits(troubled: Path) -> None:
    result = cli("results", str(troubled))
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100
    assert "DockerOOMError" in result.output
    assert "MemoryError" in result.output


def test_results_table_leaves_out_columns_rather_than_cutting_numbers(quickstart: Path) -> None:
    result = cli("results", str(quickstart), columns=60)
    assert max(len(line) for line in result.output.splitlines()) <= 60
    assert "not shown for lack of width" in result.output
    assert "…" not in "".join(re.findall(r"\d[\d.]*…", result.output))


def test_results_all_shows_every_column_with_full_keys(quickstart: Path) -> None:
    result = cli("results", str(quickstart), "--all")
    assert result.exit_code == 0
    assert "config_hash" in result.output
    assert "result.energy_source" in result.output
    assert re.search(r"[0-9a-f]{16}_c1", result.output)


def test_csv_stays_complete_and_unrounded(quickstart: Path) -> None:
    result = cli("results", str(quickstart), "--format", "csv")
    header, first = result.output.splitlines()[:2]
    columns = header.split(",")
    assert {"key", "config_hash", "param.size", "result.gflops", "started_at", "error"} <= set(
        columns
    )
    value = first.split(",")[columns.index("result.time_per_op_ms")]
    assert len(value) > 8, "CSV keeps full precision"


def test_results_of_a_dir_that_is_not_one_exits_2(tmp_path: Path) -> None:
    result = cli("results", str(tmp_path))
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (71.93822063977562, "71.94"),
        (46.7, "46.70"),
        (0.002543000050536648, "0.002543"),
        (0.000123456, "0.000123"),
        (12345.6, "12,346"),
        (2.5e15, "2.5e+15"),
        (0.0, "0"),
        (None, ""),
        (3, "3"),
    ],
)
def test_numbers_are_shown_to_four_significant_digits(value: Any, shown: str) -> None:
    assert format_value(value) == shown


# -- column choice --------------------------------------------------------------------


async def test_columns_default_to_varying_params_and_numeric_results(tmp_path: Path) -> None:
    out = await make_quickstart_results(tmp_path / "o")
    results = read_results(out)
    rows = [flat_row(r) for r in results.records]
    chosen = select_columns(results, rows)
    assert chosen.params == ["size", "dtype", "batch"]  # the study file's order
    assert chosen.constants == {"repeats": 3}
    assert chosen.results == ["gflops", "time_per_op_ms"]  # the study's report.columns
    without = select_columns(results, rows, results.report.model_copy(update={"columns": []}))
    # Numeric, not an echo of a parameter (size, batch), not all-null (energy_j).
    assert without.results == ["gflops", "time_per_op_ms"]
    unknown = select_columns(results, rows, results.report.model_copy(update={"columns": ["x"]}))
    assert unknown.unknown == ["x"]


def test_study_report_section_is_checked_against_its_parameters(tmp_path: Path) -> None:
    text = QUICKSTART_STUDY.read_text().replace("x: size", "x: sise")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"report.x 'sise' is not a parameter.*'size'"):
        load_study(path)
    with pytest.raises(ValueError, match="both"):
        Study(grid={"a": [1, 2]}, report={"x": "a", "group": "a"})  # type: ignore[arg-type]


# -- pandas ---------------------------------------------------------------------------


def test_load_results_round_trips_a_results_dir(troubled: Path, tmp_path: Path) -> None:
    from llem_dispatch import load_results

    frame = load_results(troubled)
    records = {r["key"]: r for r in read_results(troubled).records}
    assert len(frame) == len(records) == 12
    assert frame["key"].is_unique
    assert str(frame["started_at"].dtype).startswith("datetime64")
    assert frame["param.size"].dtype.kind == "i"
    assert frame["result.gflops"].dtype.kind == "f"
    for row in frame.to_dict("records"):
        record = records[row["key"]]
        assert row["status"] == record["status"]
        assert row["gpu_ids"] == record["gpu_ids"]
        for name, value in record["config"].items():
            assert row[f"param.{name}"] == value
        started = datetime.fromisoformat(record["started_at"]).astimezone(UTC)
        assert row["started_at"].to_pydatetime() == started
        if record["status"] == "succeeded":
            data = record["result"]["data"]
            assert row["result.gflops"] == data["gflops"]
            assert list(row["result.times_s"]) == data["times_s"]
    errors = dict(zip(frame["key"], frame["error"], strict=True))
    assert sorted(e for e in errors.values() if isinstance(e, str)) == [
        "DockerOOMError",
        "MemoryError",
    ]
    assert frame.attrs["study"]["name"] == "quickstart-matmul"


def test_parquet_round_trips(troubled: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from llem_dispatch import load_results

    target = tmp_path / "r.parquet"
    result = cli("results", str(troubled), "--format", "parquet", "-o", str(target))
    assert result.exit_code == 0, result.output
    back = pandas.read_parquet(target)
    frame = load_results(troubled)
    assert list(back.columns) == list(frame.columns)
    assert back["key"].tolist() == frame["key"].tolist()
    assert back["result.gflops"].equals(frame["result.gflops"])
    assert (back["started_at"] == frame["started_at"]).all()
    assert [list(v) for v in back["gpu_ids"]] == frame["gpu_ids"].tolist()
    assert cli("results", str(troubled), "--format", "parquet").exit_code == 2


def test_load_results_without_pandas_names_the_extra(
    quickstart: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llem_dispatch import load_results

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ModuleNotFoundError, match=r"llem-dispatch\[data\]"):
        load_results(quickstart)


# -- the report's data ------------------------------------------------------------------


def _embedded(html: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="llem-report-data">(.*?)</script>', html)
    assert match, "the report embeds its data"
    data: dict[str, Any] = json.loads(match.group(1))
    return data


@pytest.mark.parametrize("gpus", [1, 2])
async def test_report_has_one_bar_per_experiment_and_gpu(tmp_path: Path, gpus: int) -> None:
    out = await make_quickstart_results(tmp_path / "o", gpus_per_experiment=gpus, trouble=True)
    result = cli("report", str(out), "-o", str(tmp_path / "r.html"))
    assert result.exit_code == 0, result.output
    html = (tmp_path / "r.html").read_text()
    assert "<script src=" not in html, "self-contained: no network needed"
    data = _embedded(html)
    records = read_results(out).records
    outcome_bars = [(b["key"], b["lane"]) for b in data["bars"] if b["kind"] in EXPERIMENT_KINDS]
    expected = [(r["key"], gpu) for r in records for gpu in r["gpu_ids"]]
    assert sorted(outcome_bars) == sorted(expected)
    assert len(expected) == 12 * gpus
    retried = [b for b in data["bars"] if b["kind"] == "retried"]
    assert len(retried) == gpus, "the retried attempt is drawn on each of its GPUs"
    assert retried[0]["error"] == "DockerUnavailableError"
    assert data["summary"]["counts"] == {"succeeded": 10, "failed": 1, "error": 1, "cancelled": 0}
    assert data["summary"]["retries"] == 1
    assert {f["error"] for f in data["failures"]} == {"DockerOOMError", "MemoryError"}
    assert all(f["fix"] for f in data["failures"])
    hover = next(b for b in data["bars"] if b["kind"] == "succeeded")
    assert set(hover["config"]) == {"size", "dtype", "batch", "repeats"}
    assert "gflops" in hover["result"]


async def test_report_shows_cooldowns_and_utilisation(troubled: Path) -> None:
    data = build_report_data(read_results(troubled))
    cooldowns = [b for b in data.bars if b["kind"] == "cooldown"]
    assert cooldowns
    assert all(b["seconds"] <= 0.02 + 1e-6 for b in cooldowns)
    summary = data.summary
    busy = sum(b["seconds"] for b in data.bars if b["kind"] != "cooldown")
    assert summary["utilisation"] == pytest.approx(busy / (4 * summary["wall_s"]), rel=0.01)
    assert 0 < summary["utilisation"] <= 1


def _write_dir(path: Path, journal: list[dict[str, Any]], records: list[dict[str, Any]]) -> Path:
    (path / "records").mkdir(parents=True)
    study = {"name": "hand", "grid": {"i": [0, 1, 2]}, "experiment_gap_s": 1.0}
    (path / "study.json").write_text(json.dumps({"study": study, "gpus": ["0", "1"]}))
    (path / "journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in journal))
    for record in records:
        (path / "records" / f"{record['key']}.json").write_text(json.dumps(record))
    return path


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(1_000_000 + seconds, UTC).isoformat()


def _record(key: str, i: int, gpu: str, start: float, end: float, status: str) -> dict[str, Any]:
    return {
        "key": key,
        "config_hash": key[:16],
        "cycle": 1,
        "config": {"i": i},
        "status": status,
        "gpu_ids": [gpu],
        "queued_at": _stamp(0),
        "started_at": _stamp(start),
        "exited_at": _stamp(end),
        "ended_at": _stamp(end),
        "attempts": 1,
        "result": {"data": {"v": i}} if status == "succeeded" else None,
    }


def test_timeline_times_sessions_and_utilisation_exactly(tmp_path: Path) -> None:
    """Run 1 (10 s): a on GPU 0 0-4 s, b retried on GPU 1 0-2 s then 3-9 s; c failed.
    Run 2 (--resume, after an hour, 5 s): c again on GPU 0 0-5 s."""
    t, hour = 1_000_000.0, 3600.0
    journal = [
        {"event": "study_started", "ts": t, "resume": False},
        {"event": "started", "ts": t, "key": "a_c1", "gpu_ids": ["0"], "attempt": 1},
        {"event": "started", "ts": t, "key": "b_c1", "gpu_ids": ["1"], "attempt": 1},
        {"event": "retried", "ts": t + 2, "key": "b_c1", "attempt": 1, "error": "X"},
        {"event": "succeeded", "ts": t + 4, "key": "a_c1", "gpu_ids": ["0"]},
        {"event": "started", "ts": t + 3, "key": "b_c1", "gpu_ids": ["1"], "attempt": 2},
        {"event": "started", "ts": t + 5, "key": "c_c1", "gpu_ids": ["0"], "attempt": 1},
        {"event": "failed", "ts": t + 6, "key": "c_c1", "gpu_ids": ["0"]},
        {"event": "succeeded", "ts": t + 9, "key": "b_c1", "gpu_ids": ["1"]},
        {"event": "study_finished", "ts": t + 10},
        {"event": "study_started", "ts": t + hour, "resume": True},
        {"event": "started", "ts": t + hour, "key": "c_c1", "gpu_ids": ["0"], "attempt": 1},
        {"event": "succeeded", "ts": t + hour + 5, "key": "c_c1", "gpu_ids": ["0"]},
        {"event": "study_finished", "ts": t + hour + 5},
    ]
    records = [
        _record("a_c1", 0, "0", 0, 4, "succeeded"),
        {**_record("b_c1", 1, "1", 3, 9, "succeeded"), "attempts": 2},
        _record("c_c1", 2, "0", hour, hour + 5, "succeeded"),
    ]
    timeline = build_timeline(read_results(_write_dir(tmp_path / "d", journal, records)))
    spans = sorted(
        (b.key, b.kind, b.lane, round(b.start - t, 3), round(b.end - t, 3))
        for b in timeline.bars
        if b.kind != "cooldown"
    )
    assert spans == [
        ("a_c1", "succeeded", "0", 0, 4),
        ("b_c1", "retried", "1", 0, 2),
        ("b_c1", "succeeded", "1", 3, 9),
        ("c_c1", "failed", "0", 5, 6),
        ("c_c1", "succeeded", "0", hour, hour + 5),
    ]
    assert timeline.wall_s == pytest.approx(15)  # 10 + 5: the hour between runs is no run
    assert timeline.busy_gpu_s == pytest.approx(4 + 2 + 6 + 1 + 5)
    assert timeline.utilisation == pytest.approx(18 / (2 * 15))
    # 1 s after a, after b's retried attempt, after b and after c's failure; none
    # after c's rerun, whose run ended as it exited.
    assert timeline.cooldown_gpu_s == pytest.approx(4.0)
    assert [s.resumed for s in timeline.sessions] == [False, True]
    assert timeline.retries == 1


def test_report_of_a_results_dir_without_records_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("report", str(tmp_path))
    assert result.exit_code == 2
    assert "not a results dir" in result.output


async def test_report_axes_can_be_chosen_on_the_command_line(quickstart: Path) -> None:
    assert cli("report", str(quickstart), "--x", "sise").exit_code == 2
    result = cli("report", str(quickstart), "--x", "batch", "--group", "dtype")
    assert result.exit_code == 0, result.output
    data = _embedded((quickstart / "report.html").read_text())
    assert data["axes"] == {"x": "batch", "group": ["dtype"], "averaged": ["size"]}


# -- resume count -------------------------------------------------------------------


async def test_resumed_count_counts_only_this_studys_successes(tmp_path: Path) -> None:
    out = await make_quickstart_results(tmp_path / "o", trouble=True)
    experiments = expand_study(load_study(QUICKSTART_STUDY))
    assert resumed_count(experiments, out) == 10
    assert resumed_count(experiments[:3], out) == 3


def test_report_escapes_what_experiments_wrote(tmp_path: Path) -> None:
    from llem_dispatch.report import render_report

    evil = "</script><script>alert(1)</script><!--"
    t = 1_000_000.0
    journal = [
        {"event": "study_started", "ts": t, "resume": False},
        {"event": "started", "ts": t, "key": "a_c1", "gpu_ids": ["0"], "attempt": 1},
        {"event": "failed", "ts": t + 1, "key": "a_c1", "gpu_ids": ["0"]},
        {"event": "study_finished", "ts": t + 1},
    ]
    record = {
        **_record("a_c1", 0, "0", 0, 1, "failed"),
        "config": {"i": evil},
        "failure": {"type": "ValueError", "message": evil, "config_hash": "a"},
    }
    html = render_report(_write_dir(tmp_path / "d", journal, [record]))
    assert "<script>alert" not in html
    data = _embedded(html)
    assert data["failures"][0]["message"] == evil
    assert data["bars"][0]["config"] == {"i": evil}


def _a_then_b(t: float, b_start: float) -> list[dict[str, Any]]:
    """The journal of a on GPU 0 from 0 to 4 s, then b from `b_start` to 8 s."""
    return [
        {"event": "study_started", "ts": t, "resume": False},
        {"event": "started", "ts": t, "key": "a_c1", "gpu_ids": ["0"], "attempt": 1},
        {"event": "succeeded", "ts": t + 4, "key": "a_c1", "gpu_ids": ["0"]},
        {"event": "started", "ts": t + b_start, "key": "b_c1", "gpu_ids": ["0"], "attempt": 1},
        {"event": "succeeded", "ts": t + 8, "key": "b_c1", "gpu_ids": ["0"]},
        {"event": "study_finished", "ts": t + 8},
    ]


def test_timeline_marks_the_time_before_each_runs_first_measured_work(tmp_path: Path) -> None:
    """a on GPU 0 0-4 s, its first measured work at 1.5 s; b after it, no mark."""
    t = 1_000_000.0
    journal = _a_then_b(t, 5)
    a = {
        **_record("a_c1", 0, "0", 0, 4, "succeeded"),
        "work_started_at": _stamp(1.5),
        "gate_to_work_s": 1.5,
        "prepare_s": 3.0,
    }
    records = [a, _record("b_c1", 1, "0", 5, 8, "succeeded")]
    results = read_results(_write_dir(tmp_path / "d", journal, records))
    timeline = build_timeline(results)
    before = [(b.key, b.start - t, b.end - t) for b in timeline.bars if b.kind == "before_work"]
    assert before == [("a_c1", 0.0, 1.5)]
    assert timeline.before_work_gpu_s == pytest.approx(1.5)
    assert timeline.busy_gpu_s == pytest.approx(4 + 3)  # not counted twice
    row = flat_row(a)
    assert (row["gate_to_work_s"], row["prepare_s"], row["gate_wait_s"]) == (1.5, 3.0, None)
    shown = cli("results", str(tmp_path / "d"), columns=120)
    assert shown.exit_code == 0, shown.output
    assert "to work" in shown.output
    assert "1.50s" in shown.output


def test_a_cooldown_bar_starts_where_the_work_ended(tmp_path: Path) -> None:
    t = 1_000_000.0
    journal = _a_then_b(t, 6)
    # a's work ended at 3.5 (its `done` mark), its process exited at 4: the 1 s
    # cooldown ran from 3.5, so what is left of it after the bar ends at 4.5, not 5.
    a = {**_record("a_c1", 0, "0", 0, 4, "succeeded"), "work_ended_at": _stamp(3.5)}
    records = [a, _record("b_c1", 1, "0", 6, 8, "succeeded")]
    timeline = build_timeline(read_results(_write_dir(tmp_path / "d", journal, records)))
    cooldowns = [(b.key, b.start - t, b.end - t) for b in timeline.bars if b.kind == "cooldown"]
    assert cooldowns == [("a_c1", 4.0, 4.5)]
    assert flat_row(a)["work_ended_at"] == _stamp(3.5)
