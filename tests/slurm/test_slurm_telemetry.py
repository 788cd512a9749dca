"""GPU telemetry sampled inside each Slurm job, and its energy in the study's records.

There is no NVML here: the test switch `LLEM_TELEMETRY_READER` names a reader of
100 W per GPU, which reaches every job through its spec; the job samples the
GPUs Slurm gave it, and its samples come back in its outcome.
"""

from __future__ import annotations

import csv
import gzip
import os
from datetime import datetime
from pathlib import Path

import anyio
import pytest

from llem_dispatch.report import stats_rows
from llem_dispatch.study import iter_records
from tests.slurm.conftest import records, run_argv, study_dict, write_study

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

WATTS = 100.0

WORKLOAD = """
import time

def run(config):
    yield  # prepared
    yield  # measuring
    start = time.time()
    time.sleep(2.5)
    end = time.time()
    # What the workload itself would report: 100 W on each of its GPUs.
    return {"t_start": start, "t_end": end, "energy_j": 100.0 * (end - start) * config["n_gpus"]}
"""


def _t(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


@pytest.mark.timeout(300)
async def test_each_job_samples_its_gpus_and_records_carry_window_energy(
    tmp_path: Path, study_name: str
) -> None:
    (tmp_path / "workload.py").write_text(WORKLOAD)
    data = study_dict(
        study_name,
        1,
        gpus_field="n_gpus",
        measure={"start": "t_start", "end": "t_end", "energy": "energy_j"},
        telemetry={"interval_s": 0.05},
    )
    del data["command"]
    data.update(function="workload:run")
    data["grid"]["n_gpus"] = [1, 2]
    out = tmp_path / "out"
    env = {**os.environ, "LLEM_TELEMETRY_READER": "llem_dispatch.testing:constant_power_reader"}
    with anyio.fail_after(240):
        done = await anyio.run_process(
            run_argv(write_study(tmp_path / "study.yaml", data), out), check=False, env=env
        )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    found = list(records(out).values())
    assert len(found) == 2
    sampled: set[str] = set()
    for record in found:
        assert record["status"] == "succeeded", record
        n = record["config"]["n_gpus"]
        assert len(record["gpu_ids"]) == n
        # The phases, as a local run records them.
        for name in ("prepare_s", "gate_to_work_s", "work_started_at", "work_ended_at"):
            assert record[name] is not None, (name, record)
        block = record["telemetry"]
        # Sampled by the job, on the GPUs Slurm gave it (no NVML: named by their ids).
        assert list(block["window"]["gpus"]) == record["gpu_ids"]
        assert list(block["run"]["gpus"]) == record["gpu_ids"]
        assert block["sampler"]["where"] == "node"
        assert block["sampler"]["samples"] > 0
        window = block["window"]
        assert window["source"] == ["counter"]
        assert window["short"] is False
        assert window["energy_j"] == pytest.approx(WATTS * window["duration_s"] * n, rel=0.01)
        assert window["ratio"] == pytest.approx(1.0, rel=0.01)
        for gpu in record["gpu_ids"]:
            assert window["gpus"][gpu] == pytest.approx(WATTS * window["duration_s"], rel=0.01)
        run = block["run"]
        held = _t(record["exited_at"]) - _t(record["started_at"])
        assert run["energy_j"] == pytest.approx(WATTS * held * n, rel=0.01)
        sampled.update(record["gpu_ids"])
    # The samples reached the study's telemetry file, as a local run's do.
    with gzip.open(out / "telemetry.csv.gz", "rt") as text:
        rows = list(csv.DictReader(text))
    assert {r["gpu"] for r in rows} == sampled
    assert all(float(r["power_w"]) == WATTS for r in rows)
    stats = stats_rows(list(iter_records(out)), ["n_gpus"])
    assert [row["energy.ratio_mean"] for row in stats] == pytest.approx([1.0, 1.0], rel=0.01)
