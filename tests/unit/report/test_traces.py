"""The report's GPU telemetry: traces read from telemetry.csv.gz, thinned, drawn under the
timeline on its time axis; occupancy beside sampled SM utilisation; CI error bars."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

import anyio
import pytest

from llem_dispatch.gpu import GpuPool
from llem_dispatch.gpu.telemetry import NvmlTelemetry
from llem_dispatch.report import build_report_data, read_results
from llem_dispatch.report.traces import mean_sm_util, read_traces
from llem_dispatch.study import Study, run_study
from llem_dispatch.study.stats import describe
from llem_dispatch.testing import FakeRunner
from tests.unit.gpu.test_telemetry import FakeNvml

HEADER = "t,gpu,power_w,energy_j,temperature_c,sm_util_pct,mem_used_mb,sm_clock_mhz\n"


def _write(path: Path, lines: list[str]) -> None:
    with gzip.open(path / "telemetry.csv.gz", "wt") as out:
        out.write(HEADER + "".join(lines))


def test_traces_by_gpu_in_time_order_and_thinned(tmp_path: Path) -> None:
    lines = [
        f"{100 + i * 0.1:.1f},{i % 2},{200 + i},5,{40 if i % 4 < 2 else ''},50,1,1\n"
        for i in range(40)
    ]
    _write(tmp_path, lines[::-1])
    traces = read_traces(tmp_path)
    assert sorted(traces) == ["0", "1"]
    assert traces["0"].t == sorted(traces["0"].t)
    assert traces["0"].power_w[:2] == [200.0, 202.0]
    assert None in traces["0"].temperature_c, "a field not read stays unknown"
    thin = read_traces(tmp_path, max_points=5)["0"]
    assert len(thin.t) == 5
    assert thin.power_w[0] == pytest.approx(sum(200 + i for i in range(0, 8, 2)) / 4)
    assert mean_sm_util(traces) == pytest.approx(0.5)
    assert read_traces(tmp_path / "missing") == {}


def test_a_torn_file_gives_what_it_holds(tmp_path: Path) -> None:
    _write(tmp_path, [f"{i},0,100,1,,,,\n" for i in range(100)])
    data = (tmp_path / "telemetry.csv.gz").read_bytes()
    (tmp_path / "telemetry.csv.gz").write_bytes(data[: len(data) - 7])
    traces = read_traces(tmp_path)
    assert isinstance(traces, dict)


@pytest.fixture
async def telemetry_results(tmp_path: Path) -> Path:
    async def work(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        await anyio.sleep(0.15)
        return {"e": 10.0 + config["x"] + config.get("jitter", 0)}

    study = Study.model_validate(
        {
            "name": "traced",
            "grid": {"x": [1, 2], "y": [1, 2]},
            "report": {"x": "x", "group": "y"},
            "n_cycles": 3,
            "gpus_per_experiment": 1,
            "telemetry": {"enabled": True, "interval_s": 0.02},
        }
    )
    out = tmp_path / "o"
    with anyio.fail_after(30):
        await run_study(
            study,
            out,
            runner=FakeRunner(work),
            pool=GpuPool.virtual_devices(2),
            telemetry_reader=NvmlTelemetry(["0", "1"], nvml=FakeNvml()),
        )
    return out


async def test_report_data_has_traces_occupancy_and_sm_util(telemetry_results: Path) -> None:
    data = build_report_data(read_results(telemetry_results))
    assert sorted(data.traces) == ["0", "1"]
    trace = data.traces["0"]
    assert len(trace["t"]) == len(trace["power_w"]) > 5
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}$", trace["t"][0])
    assert data.summary["sm_util"] == pytest.approx(0.87)
    assert data.summary["occupancy"] == data.summary["utilisation"]
    assert json.loads(json.dumps(data.as_json()))["traces"]["1"]["temperature_c"][0] == 41.0


async def test_html_draws_power_and_temperature_under_the_timeline(
    telemetry_results: Path,
) -> None:
    pytest.importorskip("plotly")
    from llem_dispatch.report import render_report

    page = render_report(telemetry_results)
    assert "power (W)" in page
    assert "temperature (°C)" in page or "temperature (\\u00b0C)" in page
    assert "GPU occupancy" in page
    assert "SM utilisation" in page
    assert "95% confidence interval" in page
    # The bars and traces share one time axis: the upper rows follow the bottom one.
    assert re.search(r'"xaxis":\{"anchor":"y","domain":\[[^]]*\],"matches":"x3"', page)
    assert re.search(r'"xaxis2":\{"anchor":"y2","domain":\[[^]]*\],"matches":"x3"', page)


def test_error_bars_are_the_95_ci_of_the_mean() -> None:
    pytest.importorskip("plotly")
    import plotly.graph_objects as go

    from llem_dispatch.report.html import _line_figure
    from llem_dispatch.report.selection import PlotAxes
    from llem_dispatch.report.series import line_series

    rows = [
        {"status": "succeeded", "results": {"e": v}, "config": {"x": 1}, "cycle": i}
        for i, v in enumerate([10.0, 12.0, 17.0])
    ]
    lines = line_series(rows, PlotAxes("x", [], []), lambda r: r["results"]["e"])
    fig = _line_figure(lines, "x", "e", go)
    assert fig.data[0].error_y.array[0] == pytest.approx(describe([10.0, 12.0, 17.0]).ci95)
