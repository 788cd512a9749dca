"""GPU telemetry on a fake NVML module: batched reads, energy over windows, the sampler
thread and its file, and run_study's per-experiment energy beside the workload's own."""

from __future__ import annotations

import csv
import gzip
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from llem_dispatch.gpu import GpuPool
from llem_dispatch.gpu.telemetry import (
    CSV_COLUMNS,
    NvmlTelemetry,
    Sample,
    TelemetrySampler,
    counter_at,
    window_energy,
)
from llem_dispatch.report import stats_rows
from llem_dispatch.study import Study, iter_records, run_study
from llem_dispatch.testing import FakeRunner


class FakeNvml:
    """The pynvml calls the sampler makes; every device draws `watts`, counted exactly."""

    NVML_CLOCK_SM = 1

    def __init__(self, watts: float = 250.0, fields_work: bool = True) -> None:
        self.watts = watts
        self.fields_work = fields_work
        self.t0 = time.time()
        self.calls: list[str] = []

    def _energy_mj(self) -> int:
        return int(self.watts * (time.time() - self.t0) * 1000) + 5_000_000

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"h{index}"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return f"h-{uuid}"

    def nvmlDeviceGetFieldValues(self, handle: str, ids: list[int]) -> list[Any]:
        self.calls.append("fields")
        if not self.fields_work:
            raise RuntimeError("NVML_ERROR_FUNCTION_NOT_FOUND")
        values = {83: (3, "ullVal", self._energy_mj()), 186: (1, "uiVal", int(self.watts * 1000))}
        out = []
        for field in ids:
            kind, member, raw = values[field]
            out.append(
                SimpleNamespace(
                    nvmlReturn=0, valueType=kind, value=SimpleNamespace(**{member: raw})
                )
            )
        return out

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        self.calls.append("power")
        return int(self.watts * 1000)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        self.calls.append("energy")
        return self._energy_mj()

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        self.calls.append("temperature")
        return 41

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        self.calls.append("util")
        return SimpleNamespace(gpu=87, memory=30)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        self.calls.append("memory")
        return SimpleNamespace(used=3 * 2**30, total=140 * 2**30)

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        self.calls.append("clock")
        return 1980


def test_energy_and_power_come_from_one_batched_call_per_gpu() -> None:
    nvml = FakeNvml()
    reader = NvmlTelemetry(["0", "GPU-abc"], nvml=nvml)
    fast = reader.read(detail=False)
    assert nvml.calls == ["fields", "fields"], "one NVML call per GPU for energy + power"
    assert [s.gpu for s in fast] == ["0", "GPU-abc"]
    assert fast[0].power_w == 250.0
    assert fast[0].energy_j is not None
    assert fast[0].energy_j >= 5000.0
    assert fast[0].temperature_c is None
    nvml.calls.clear()
    full = reader.read(detail=True)[0]
    assert nvml.calls[:5] == ["fields", "util", "memory", "temperature", "clock"]
    assert (full.temperature_c, full.sm_util_pct, full.mem_used_mb, full.sm_clock_mhz) == (
        41.0,
        87.0,
        3072.0,
        1980.0,
    )


def test_without_field_values_each_figure_is_read_on_its_own() -> None:
    nvml = FakeNvml(fields_work=False)
    reader = NvmlTelemetry(["0"], nvml=nvml)
    first = reader.read(detail=False)[0]
    assert first.power_w == 250.0
    assert first.energy_j is not None
    nvml.calls.clear()
    reader.read(detail=False)
    assert nvml.calls == ["power", "energy"], "the failing batched call is not retried"


def test_counter_is_interpolated_between_samples() -> None:
    points = [(10.0, 100.0), (10.1, 110.0), (10.2, 130.0)]
    assert counter_at(points, 10.05) == pytest.approx(105.0)
    assert counter_at(points, 10.2) == 130.0
    assert counter_at(points, 9.9) is None
    assert counter_at(points, 10.3) is None
    assert counter_at([], 1.0) is None


def test_window_energy_from_the_counter_else_from_power() -> None:
    samples = [Sample(t=float(t), gpu="0", power_w=100.0, energy_j=100.0 * t) for t in range(10)]
    window = window_energy(samples, 2.5, 7.5)
    assert (window.energy_j, window.source, window.short) == (
        pytest.approx(500.0),
        "counter",
        False,
    )
    no_counter = [Sample(t=s.t, gpu="0", power_w=s.power_w) for s in samples]
    powered = window_energy(no_counter, 2.5, 3.5)
    assert (powered.energy_j, powered.source, powered.short) == (
        pytest.approx(100.0),
        "power",
        True,
    )
    outside = window_energy(samples, 8.0, 12.0)
    assert (outside.energy_j, outside.source) == (None, "none")


def _wait_until(condition: Any, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_sampler_thread_keeps_history_and_appends_one_csv(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.csv.gz"
    nvml = FakeNvml()
    for _ in range(2):  # a resumed study appends to the same file
        sampler = TelemetrySampler(
            NvmlTelemetry(["0", "1"], nvml=nvml), interval_s=0.01, detail_s=0.05, path=path
        )
        sampler.start()
        _wait_until(lambda s=sampler: s.samples >= 20)
        assert threading.current_thread() is not sampler._thread
        sampler.stop()
        assert sampler._thread is not None
        assert not sampler._thread.is_alive()
        cost = sampler.cost()
        assert cost["samples"] >= 20
        assert 0.0 <= cost["cpu_share"] <= 1.5
    with gzip.open(path, "rt") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert all(r["t"] != "t" for r in rows), "one header across appends"
    assert {r["gpu"] for r in rows} == {"0", "1"}
    assert any(r["temperature_c"] == "41" for r in rows)
    assert any(r["temperature_c"] == "" for r in rows), "detail fields only every detail_s"
    history = sampler.samples_of("0", 0.0, time.time())
    assert history
    assert [s.t for s in history] == sorted(s.t for s in history)


def test_a_failing_reader_leaves_gaps_not_a_dead_thread(tmp_path: Path) -> None:
    calls = {"n": 0}

    class Flaky:
        def read(self, detail: bool) -> list[Sample]:
            calls["n"] += 1
            if calls["n"] % 2:
                raise OSError("driver hiccup")
            return [Sample(t=time.time(), gpu="0", power_w=1.0)]

    sampler = TelemetrySampler(Flaky(), interval_s=0.01)
    sampler.start()
    _wait_until(lambda: sampler.samples >= 5)
    sampler.stop()
    assert sampler.errors >= 4


async def test_run_study_records_energy_per_gpu_beside_the_workloads_own(tmp_path: Path) -> None:
    nvml = FakeNvml(watts=200.0)

    async def workload(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        start = time.time()
        await anyio.sleep(0.3)
        end = time.time()
        # What the workload itself would report: 200 W on each of its GPUs, 5% high.
        return {"t_start": start, "t_end": end, "total_energy_j": 1.05 * 200 * (end - start) * 2}

    study = Study.model_validate(
        {
            "name": "tel",
            "grid": {"x": [1, 2]},
            "gpus_per_experiment": 2,
            "measure": {"start": "t_start", "end": "t_end", "energy": "total_energy_j"},
            "telemetry": {"enabled": True, "interval_s": 0.02},
        }
    )
    out = tmp_path / "o"
    with anyio.fail_after(30):
        summary = await run_study(
            study,
            out,
            runner=FakeRunner(workload),
            pool=GpuPool.virtual_devices(2),
            telemetry_reader=NvmlTelemetry(["0", "1"], nvml=nvml),
        )
    assert summary.succeeded == 2
    assert summary.telemetry is not None
    assert summary.telemetry["samples"] > 0
    assert "cpu_share" in summary.telemetry
    saved = json.loads((out / "summary.json").read_text())
    assert saved["telemetry"]["file"] == "telemetry.csv.gz"
    for path in (out / "records").glob("*.json"):
        record = json.loads(path.read_text())
        block = record["telemetry"]
        run = block["run"]
        assert set(run["gpus"]) == {"0", "1"}
        for gpu in run["gpus"].values():
            assert gpu["energy_exit_j"] > gpu["energy_start_j"]
        duration = run["end"] - run["start"]
        assert run["energy_j"] == pytest.approx(2 * 200 * duration, rel=0.05)
        window = block["window"]
        assert window["short"] is True, "0.3 s is under the counter's trustworthy window"
        assert window["energy_j"] == pytest.approx(2 * 200 * window["duration_s"], rel=0.02)
        assert window["ratio"] == pytest.approx(1 / 1.05, rel=0.02)
        assert window["source"] == ["counter"]
    assert (out / "telemetry.csv.gz").stat().st_size > 0
    rows = stats_rows(list(iter_records(out)), ["x"])
    assert rows[0]["energy.ratio_mean"] == pytest.approx(1 / 1.05, rel=0.02)
    assert rows[0]["energy.window_j_mean"] > 0


async def test_telemetry_is_off_on_virtual_gpus_by_default(tmp_path: Path) -> None:
    study = Study.model_validate({"name": "v", "grid": {"x": [1]}, "gpus_per_experiment": 1})
    summary = await run_study(
        study, tmp_path / "o", runner=FakeRunner(), pool=GpuPool.virtual_devices(1)
    )
    assert summary.telemetry is None
    assert not (tmp_path / "o" / "telemetry.csv.gz").exists()
    record = json.loads(next((tmp_path / "o" / "records").glob("*.json")).read_text())
    assert "telemetry" not in record
