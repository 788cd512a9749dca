"""The measurement as a reviewer reads it: means over cycles against a swept parameter,
no clock readings plotted, telemetry's energy over the workload's, disturbed windows.

Results dirs are written by hand (an energy sweep: hidden x batch, 3 cycles each,
with `measure:` and telemetry), so every expected figure is known exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llem_dispatch.cli import app
from llem_dispatch.report import (
    build_report_data,
    flat_row,
    read_results,
    select_columns,
    stats_rows,
    window_disturbed,
)
from llem_dispatch.report.selection import is_timestamp
from llem_dispatch.study.stats import describe

HIDDEN, BATCH, CYCLES = (256, 512, 1024), (1, 8), 3
EPOCH = 1_800_000_000.0
#: (hidden, batch, cycle) whose measured window a neighbour's preparation overlapped.
DISTURBED = {(512, 8, 2), (1024, 1, 3)}


def _tokens(hidden: int, batch: int, cycle: int) -> float:
    return 1000.0 * batch / hidden * (1 + 0.01 * cycle)


def _ratio(hidden: int, batch: int, cycle: int) -> float:
    return 1.0 + 0.002 * hidden / 256 + 0.01 * (cycle - 2)


def _record(hidden: int, batch: int, cycle: int, *, windows: bool = True) -> dict[str, Any]:
    digest = f"{hidden:04d}{batch:04d}deadbeef"
    start = EPOCH + 100 * cycle + hidden / 10 + batch
    reported = 50.0 * hidden / 256
    record: dict[str, Any] = {
        "key": f"{digest}_c{cycle}",
        "config_hash": digest,
        "cycle": cycle,
        "tags": {"cycle": cycle, "key": f"{digest}_c{cycle}"},
        "config": {"hidden": hidden, "batch": batch, "gpus": 1},
        "status": "succeeded",
        "gpu_ids": ["0"],
        "queued_at": "2027-01-15T08:00:00+00:00",
        "started_at": "2027-01-15T08:00:01+00:00",
        "ended_at": "2027-01-15T08:00:03+00:00",
        "result": {
            "data": {
                "tokens_per_s": _tokens(hidden, batch, cycle),
                "total_energy_j": reported,
                "gate_wall": start - 0.5,
                "t_start": start,
                "t_end": start + 2.0,
            }
        },
        "telemetry": {
            "run": {"energy_j": 3 * reported},
            "window": {
                "energy_j": reported * _ratio(hidden, batch, cycle),
                "reported_j": reported,
                "ratio": _ratio(hidden, batch, cycle),
                "duration_s": 2.0,
                "short": False,
            },
        },
    }
    if windows:
        disturbed = (hidden, batch, cycle) in DISTURBED
        record.update(
            {
                "cpus": [2, 3],
                "isolation": "run",
                "window_prepare_overlap_s": 0.8 if disturbed else 0.0,
                "window_work_overlap_s": 1.5,
                "neighbours_paused_s": 0.0,
                "window_disturbed": disturbed,
            }
        )
    return record


def _write(path: Path, records: list[dict[str, Any]], **study: Any) -> Path:
    (path / "records").mkdir(parents=True)
    spec = {
        "name": "llm-energy",
        "grid": {"hidden": list(HIDDEN), "batch": list(BATCH)},
        "base": {"gpus": 1},
        "n_cycles": CYCLES,
        "measure": {"start": "t_start", "end": "t_end", "energy": "total_energy_j"},
        **study,
    }
    (path / "study.json").write_text(json.dumps({"study": spec, "gpus": ["0", "1"]}))
    (path / "journal.jsonl").write_text("")
    for record in records:
        (path / "records" / f"{record['key']}.json").write_text(json.dumps(record))
    return path


def _sweep(**kwargs: Any) -> list[dict[str, Any]]:
    return [_record(h, b, c, **kwargs) for h in HIDDEN for b in BATCH for c in range(1, CYCLES + 1)]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return _write(tmp_path / "sweep", _sweep())


@pytest.fixture
def old_sweep(tmp_path: Path) -> Path:
    """The same sweep as results written before records said what shared the window."""
    records = _sweep(windows=False)
    for record in records:
        record.pop("telemetry")
    return _write(tmp_path / "old", records, measure={})


def cli(*args: str, columns: int = 160) -> Any:
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(columns)})


def _embedded(html: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="llem-report-data">(.*?)</script>', html)
    assert match, "the report embeds its data"
    data: dict[str, Any] = json.loads(match.group(1))
    return data


# -- 1. means over cycles against a swept parameter --------------------------------------


def test_default_plot_is_the_mean_over_cycles_against_a_swept_parameter(sweep: Path) -> None:
    data = build_report_data(read_results(sweep))
    assert data.axes.x == "hidden", "the parameter with most values, not the cycle"
    assert data.axes.group == ["batch"]
    lines = {line["label"]: line for line in data.plots["tokens_per_s"]}
    assert set(lines) == {"batch=1", "batch=8"}, "one line per value of the other parameter"
    for batch in BATCH:
        points = lines[f"batch={batch}"]["points"]
        assert [p["x"] for p in points] == list(HIDDEN)
        for point in points:
            values = [_tokens(point["x"], batch, c) for c in range(1, CYCLES + 1)]
            expected = describe(values)
            assert point["n"] == CYCLES
            assert point["mean"] == pytest.approx(expected.mean)
            assert point["ci95"] == pytest.approx(expected.ci95)
            assert point["ci95"] > 0


def test_the_cycle_is_never_the_default_x_even_with_the_most_values(tmp_path: Path) -> None:
    records = [_record(256, b, c) for b in BATCH for c in range(1, 7)]
    path = _write(tmp_path / "d", records, grid={"hidden": [256], "batch": list(BATCH)})
    data = build_report_data(read_results(path))
    assert data.axes.x == "batch"
    assert "cycle" not in data.axes.group
    (line,) = data.plots["tokens_per_s"]
    assert [p["n"] for p in line["points"]] == [6, 6]


def test_a_single_config_is_one_point_not_a_line_over_cycles(tmp_path: Path) -> None:
    records = [_record(256, 1, c) for c in range(1, 5)]
    path = _write(tmp_path / "d", records, grid={}, base={"hidden": 256, "batch": 1, "gpus": 1})
    data = build_report_data(read_results(path))
    assert data.axes.x != "cycle"
    (line,) = data.plots["tokens_per_s"]
    assert len(line["points"]) == 1
    assert line["points"][0]["n"] == 4


def test_the_page_draws_error_bars_and_says_what_they_are(sweep: Path, tmp_path: Path) -> None:
    pytest.importorskip("plotly")
    result = cli("report", str(sweep), "-o", str(tmp_path / "r.html"))
    assert result.exit_code == 0, result.output
    assert "2 of 18 measured windows disturbed" in result.output
    page = (tmp_path / "r.html").read_text()
    assert "the mean over cycles" in page
    assert re.search(r'"error_y":\{"array":\[[^]]*[1-9][^]]*\],"type":"data","visible":true', page)
    assert _embedded(page)["axes"]["x"] == "hidden"


# -- 2. clock readings and the window's bounds are not results ----------------------------


@pytest.mark.parametrize(
    ("values", "timestamp"),
    [
        ([1.8e9, 1.80001e9], True),
        ([1_000_000_000, 3_999_999_999.5], True),
        ([1.8e9, 5.0], False),
        ([2.5e15], False),
        ([0.5, 12.0], False),
        ([], False),
        ([True], False),
    ],
)
def test_a_field_whose_values_all_are_unix_times_is_a_timestamp(
    values: list[Any], timestamp: bool
) -> None:
    assert is_timestamp(values) is timestamp


def test_epoch_fields_and_measure_bounds_are_not_default_columns(tmp_path: Path) -> None:
    records = _sweep()
    for record in records:
        # The window's bounds by a clock that is no epoch: left out by name.
        data = record["result"]["data"]
        data["t_start"], data["t_end"] = 12.5, 14.5
    results = read_results(_write(tmp_path / "d", records))
    chosen = select_columns(results, [flat_row(r) for r in results.records])
    assert chosen.results == ["tokens_per_s", "total_energy_j"]
    assert set(chosen.hidden) == {"gate_wall", "t_start", "t_end"}
    data = build_report_data(results)
    assert set(data.plots) == {"tokens_per_s", "total_energy_j"}
    hovered = {k for b in data.bars for k in b["result"]}
    assert not hovered & {"gate_wall", "t_start", "t_end"}
    shown = cli("results", str(tmp_path / "d"))
    assert shown.exit_code == 0, shown.output
    assert "gate_wall" not in shown.output
    assert "tokens_per_s" in shown.output


def test_a_timestamp_the_study_asks_for_is_still_shown(sweep: Path) -> None:
    results = read_results(sweep)
    spec = results.report.model_copy(update={"columns": ["gate_wall"]})
    assert select_columns(results, [flat_row(r) for r in results.records], spec).results == [
        "gate_wall"
    ]


# -- 3. telemetry's energy over the workload's -------------------------------------------


def test_energy_ratio_per_config_with_its_spread(sweep: Path) -> None:
    energy = build_report_data(read_results(sweep)).energy
    assert energy["field"] == "total_energy_j"
    configs = {(c["params"]["hidden"], c["params"]["batch"]): c for c in energy["configs"]}
    assert set(configs) == {(h, b) for h in HIDDEN for b in BATCH}
    ratios = [_ratio(512, 8, c) for c in range(1, CYCLES + 1)]
    one = configs[(512, 8)]
    assert one["n"] == CYCLES
    assert one["mean"] == pytest.approx(describe(ratios).mean)
    assert one["ci95"] == pytest.approx(describe(ratios).ci95)
    assert (one["min"], one["max"]) == (pytest.approx(min(ratios)), pytest.approx(max(ratios)))
    assert one["reported_j"] == pytest.approx(100.0)
    assert one["disturbed"] == 1
    lines = {line["label"]: line for line in energy["lines"]}
    assert [p["x"] for p in lines["batch=8"]["points"]] == list(HIDDEN)


def test_the_page_shows_the_ratio_section(sweep: Path) -> None:
    pytest.importorskip("plotly")
    from llem_dispatch.report import render_report

    page = render_report(sweep)
    assert "Energy: telemetry over the workload" in page
    assert "result.total_energy_j" in page


def test_no_ratio_where_either_side_is_missing(tmp_path: Path, old_sweep: Path) -> None:
    records = _sweep()
    for record in records:
        if record["config"]["hidden"] == 256:
            record["telemetry"]["window"]["reported_j"] = None  # no workload figure
            record["telemetry"]["window"]["ratio"] = None
        if record["config"]["hidden"] == 512:
            del record["telemetry"]  # no telemetry
    energy = build_report_data(read_results(_write(tmp_path / "d", records))).energy
    assert {c["params"]["hidden"] for c in energy["configs"]} == {1024}
    assert build_report_data(read_results(old_sweep)).energy == {}
    pytest.importorskip("plotly")
    from llem_dispatch.report import render_report

    assert "Energy: telemetry" not in render_report(old_sweep)


# -- 4. disturbed windows ----------------------------------------------------------------


def test_window_disturbed_reads_the_flag_or_the_overlap() -> None:
    assert window_disturbed({"window_disturbed": True}) is True
    assert window_disturbed({"window_disturbed": False, "window_prepare_overlap_s": 2}) is False
    assert window_disturbed({"window_prepare_overlap_s": 0.3}) is True
    assert window_disturbed({"window_prepare_overlap_s": 0.0}) is False
    assert window_disturbed({}) is None
    row = flat_row(_record(512, 8, 2))
    assert row["window_disturbed"] is True
    assert (row["cpus"], row["isolation"], row["window_work_overlap_s"]) == ("2,3", "run", 1.5)
    assert flat_row({"key": "a"})["window_disturbed"] is None


def test_the_report_flags_disturbed_windows(sweep: Path) -> None:
    data = build_report_data(read_results(sweep))
    assert (data.summary["windows_disturbed"], data.summary["windows_checked"]) == (2, 18)
    assert {_id(r) for r in data.rows if r["disturbed"]} == DISTURBED
    assert all(r["disturbed"] is False for r in data.rows if _id(r) not in DISTURBED)
    points = {
        (line["label"], p["x"]): p["disturbed"]
        for line in data.plots["tokens_per_s"]
        for p in line["points"]
    }
    assert points[("batch=8", 512)] == 1
    assert points[("batch=1", 1024)] == 1
    assert sum(points.values()) == 2


def _id(row: dict[str, Any]) -> tuple[int, int, int]:
    return (row["config"]["hidden"], row["config"]["batch"], row["cycle"])


def test_the_page_marks_disturbed_windows(sweep: Path, old_sweep: Path) -> None:
    pytest.importorskip("plotly")
    from llem_dispatch.report import render_report

    page = render_report(sweep)
    assert page.count("&#9888; disturbed") == 2, "the experiments table's window column"
    assert "disturbed windows" in page
    assert re.search(
        r'class="card bad"><div class=label>disturbed windows</div>'
        r"<div class=value>2 of 18<",
        page,
    )
    assert "circle-x-open" in page, "a disturbed point has its own marker"
    assert "n=3 cycles, 1 disturbed (a neighbour prepared in its window)" in page
    assert "&lt;br&gt;" not in page, "hover lines are broken, not escaped"
    old = render_report(old_sweep)
    assert "disturbed windows" not in old
    assert '<th class="">window</th>' not in old


def test_results_table_shows_the_window_column(sweep: Path, old_sweep: Path) -> None:
    shown = cli("results", str(sweep))
    assert shown.exit_code == 0, shown.output
    header = next(line for line in shown.output.splitlines() if line.lstrip().startswith("key"))
    assert "window" in header.split()
    assert shown.output.count("disturbed") == 2
    assert shown.output.count("clean") == 16
    old = cli("results", str(old_sweep))
    assert "window" not in old.output


def test_stats_can_leave_out_disturbed_windows(sweep: Path) -> None:
    records = read_results(sweep).records
    every = {
        (r["param.hidden"], r["param.batch"]): r for r in stats_rows(records, ["hidden", "batch"])
    }
    clean = {
        (r["param.hidden"], r["param.batch"]): r
        for r in stats_rows(records, ["hidden", "batch"], exclude_disturbed=True)
    }
    assert every[(512, 8)]["n"] == 3
    assert clean[(512, 8)]["n"] == 2
    assert clean[(512, 8)]["disturbed"] == every[(512, 8)]["disturbed"] == 1
    assert clean[(256, 1)]["n"] == 3
    expected = describe([_tokens(512, 8, c) for c in (1, 3)])
    assert clean[(512, 8)]["result.tokens_per_s_mean"] == pytest.approx(expected.mean)


def test_results_stats_exclude_disturbed_says_how_many(sweep: Path) -> None:
    plain = cli("results", str(sweep), "--stats", "--format", "jsonl")
    assert plain.exit_code == 0, plain.output
    assert sum(json.loads(line)["n"] for line in plain.stdout.splitlines()) == 18
    out = cli("results", str(sweep), "--stats", "--exclude-disturbed", "--format", "jsonl")
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sum(r["n"] for r in rows) == 16
    assert "left out 2 of 18 measured windows" in out.stderr
    table = cli("results", str(sweep), "--stats", "--exclude-disturbed")
    assert table.exit_code == 0, table.output
    assert "left out 2 of 18" in table.output
    assert "energy.ratio" in table.output
    listing = cli("results", str(sweep), "--exclude-disturbed", "--format", "csv")
    assert len(listing.stdout.splitlines()) == 1 + 16


def test_exclude_disturbed_on_old_results_says_nothing_was_left_out(old_sweep: Path) -> None:
    out = cli("results", str(old_sweep), "--stats", "--exclude-disturbed", "--format", "jsonl")
    assert out.exit_code == 0, out.output
    assert "none left out" in out.stderr
    assert sum(json.loads(line)["n"] for line in out.stdout.splitlines()) == 18
    assert all("disturbed" not in json.loads(line) for line in out.stdout.splitlines())
