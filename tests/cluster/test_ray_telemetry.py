"""GPU telemetry sampled on each Ray node, and its energy in the study's records.

There is no NVML here: the test switch `LLEM_TELEMETRY_READER` names a reader of
100 W per GPU, which the driver ships with every task; each task samples the GPUs
Ray assigned it on its node, and its samples come back in its attempt report.
"""

from __future__ import annotations

import csv
import gzip
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from llem_dispatch import Study, run_study
from llem_dispatch.report import stats_rows
from llem_dispatch.study import iter_records
from tests.cluster.conftest import GPUS_PER_NODE, records

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

WATTS = 100.0

#: An experiment with the phase marks any program may write, and its own energy figure.
EXPERIMENT = """
import json, os, time

def mark(name):
    with open(os.environ["LLEM_MARKS_PATH"], "a") as fh:
        fh.write(json.dumps({"mark": name, "t": time.time()}) + "\\n")

for name in ("start", "ready", "work"):
    mark(name)
start = time.time()
time.sleep(2.5)
end = time.time()
mark("done")
gpus = os.environ["LLEM_GPU_IDS"].split(",")
out = {"t_start": start, "t_end": end, "energy_j": 100.0 * (end - start) * len(gpus)}
tmp = os.path.join(os.environ["LLEM_EXCHANGE_DIR"], "t.json")
json.dump(out, open(tmp, "w"))
os.replace(tmp, os.environ["LLEM_RESULT_PATH"])
"""


def _t(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


async def test_each_task_samples_its_gpus_on_its_node_and_records_carry_window_energy(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, _ = ray_cluster
    monkeypatch.setenv("LLEM_TELEMETRY_READER", "llem_dispatch.testing:constant_power_reader")
    study = Study.model_validate(
        {
            "name": "ray-telemetry",
            "runner": "local",
            "command": [sys.executable, "-c", EXPERIMENT],
            "stop_grace_s": 2,
            "gpus_per_experiment": 1,
            "grid": {"i": list(range(4))},
            "measure": {"start": "t_start", "end": "t_end", "energy": "energy_j"},
            "telemetry": {"interval_s": 0.05},
        }
    )
    out = tmp_path / "out"
    summary = await run_study(study, out, cluster=cluster.address)

    assert (summary.succeeded, summary.failed, summary.errored) == (4, 0, 0)
    found = list(records(out).values())
    assert len(found) == 4
    for record in found:
        assert record["node"]["hostname"]
        (gpu,) = record["gpu_ids"]
        assert gpu in {str(i) for i in range(GPUS_PER_NODE)}
        # The phases, as a local run records them.
        for name in ("prepare_s", "gate_to_work_s", "work_started_at", "work_ended_at"):
            assert record[name] is not None, (name, record)
        block = record["telemetry"]
        # Sampled on its node, on the GPU Ray assigned it (no NVML: named by its id).
        assert list(block["window"]["gpus"]) == [gpu]
        assert list(block["run"]["gpus"]) == [gpu]
        assert block["sampler"]["where"] == "node"
        assert block["sampler"]["samples"] > 0
        window = block["window"]
        assert window["source"] == ["counter"]
        assert window["short"] is False
        assert window["energy_j"] == pytest.approx(WATTS * window["duration_s"], rel=0.01)
        assert window["ratio"] == pytest.approx(1.0, rel=0.01)
        held = _t(record["exited_at"]) - _t(record["started_at"])
        assert block["run"]["energy_j"] == pytest.approx(WATTS * held, rel=0.01)
    # The samples reached the study's telemetry file, as a local run's do.
    with gzip.open(out / "telemetry.csv.gz", "rt") as text:
        rows = list(csv.DictReader(text))
    assert {r["gpu"] for r in rows} == {g for r in found for g in r["gpu_ids"]}
    assert all(float(r["power_w"]) == WATTS for r in rows)
    stats = stats_rows(list(iter_records(out)), ["i"])
    assert [row["energy.ratio_mean"] for row in stats] == pytest.approx([1.0] * 4, rel=0.01)
