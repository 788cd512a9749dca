"""Telemetry where an attempt runs: its samples on the wire, and the driver's energy from them.

The merge is pure: an `AttemptTelemetry` (what a Ray node or Slurm job sends back in
its report) reaches the record draft, and the study's energy block and telemetry
file come from it as from this host's sampler.
"""

from __future__ import annotations

import csv
import gzip
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from llem_dispatch.dispatch.attempt import AttemptReport
from llem_dispatch.dispatch.records import RecordDraft, RunRecord
from llem_dispatch.errors import ConfigError
from llem_dispatch.gpu.attempt_telemetry import (
    READER_ENV,
    AttemptSampling,
    AttemptTelemetry,
    NodeTelemetry,
    load_reader_factory,
)
from llem_dispatch.gpu.telemetry import CSV_COLUMNS
from llem_dispatch.study import Study
from llem_dispatch.study.telemetry import TELEMETRY_FILE, node_telemetry, record_energy
from llem_dispatch.testing import ConstantPowerReader

READER = "llem_dispatch.testing:constant_power_reader"
MEASURE = {"start": "t_start", "end": "t_end", "energy": "energy_j"}


def _at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _shipped(gpus: list[str], watts: float, t0: float, t1: float, step: float) -> AttemptTelemetry:
    """Samples every `step` s over [t0, t1] of GPUs drawing `watts` (counter = watts x t)."""
    n = round((t1 - t0) / step)
    rows = [
        [t0 + i * step, gpu, watts, watts * (t0 + i * step), None, None, None, None]
        for i in range(n + 1)
        for gpu in gpus
    ]
    return AttemptTelemetry(gpus=gpus, interval_s=step, samples=rows, cpu_s=0.01)


def _record(
    telemetry: AttemptTelemetry | None, start: float, exit_: float, result: dict[str, Any]
) -> RunRecord:
    """A record as a Ray or Slurm placement builds it: its report through JSON, as on the wire."""
    report = AttemptReport(started_at=_at(start), exited_at=_at(exit_)).with_telemetry(telemetry)
    draft = RecordDraft(config_hash="abcd", config={}, queued_at=_at(start))
    AttemptReport.from_wire(json.loads(json.dumps(report.to_wire()))).fill(draft)
    draft.status = "succeeded"
    draft.gpu_ids = ["0", "1"]  # the node's own ids: the samples name the GPUs by UUID
    draft.result = result
    return draft.build()


async def test_window_energy_comes_from_the_samples_the_node_sent(tmp_path: Path) -> None:
    gpus = ["GPU-aaa", "GPU-bbb"]
    shipped = _shipped(gpus, watts=100.0, t0=1000.0, t1=1020.0, step=0.1)
    result = {"t_start": 1005.0, "t_end": 1012.5, "energy_j": 1400.0}
    record = _record(shipped, 1001.0, 1019.0, result)
    assert record.node_telemetry is not None
    assert "node_telemetry" not in record.model_dump(mode="json"), "never written as is"

    block = await record_energy(None, record, MEASURE, tmp_path)

    assert block is not None
    run, window = block["run"], block["window"]
    assert list(run["gpus"]) == gpus, "the GPUs the attempt held, by UUID"
    assert run["energy_j"] == pytest.approx(2 * 100.0 * 18.0)
    assert list(window["gpus"]) == gpus
    assert window["gpus"]["GPU-aaa"] == pytest.approx(100.0 * 7.5)
    assert window["energy_j"] == pytest.approx(2 * 100.0 * 7.5)
    assert window["ratio"] == pytest.approx(1500.0 / 1400.0)
    assert (window["source"], window["short"]) == (["counter"], False)
    assert block["sampler"] == {
        "where": "node",
        "samples": len(shipped.samples),
        "errors": 0,
        "interval_s": 0.1,
        "cpu_s": 0.01,
    }
    with gzip.open(tmp_path / TELEMETRY_FILE, "rt") as text:
        rows = list(csv.DictReader(text))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == len(shipped.samples)
    assert {r["gpu"] for r in rows} == set(gpus)


async def test_a_window_outside_the_samples_and_a_record_without_any(tmp_path: Path) -> None:
    shipped = _shipped(["GPU-a"], watts=50.0, t0=0.0, t1=10.0, step=0.5)
    late = _record(shipped, 1.0, 9.0, {"t_start": 8.0, "t_end": 30.0})
    block = await record_energy(None, late, MEASURE, tmp_path)
    assert block is not None
    assert block["window"]["energy_j"] is None, "not covered: unknown, not a guess"
    assert block["run"]["energy_j"] == pytest.approx(50.0 * 8.0)
    bare = _record(None, 1.0, 9.0, {})
    assert await record_energy(None, bare, MEASURE, tmp_path) is None


def test_wire_rows_come_back_as_samples_by_gpu_and_time() -> None:
    shipped = AttemptTelemetry(
        gpus=["x"],
        interval_s=1.0,
        samples=[[2.0, "x", 1, 2, None, None, None, None], [1.0, "x", 1, 1, 30, 5, 7, 9], ["bad"]],
    )
    again = AttemptTelemetry.model_validate_json(shipped.model_dump_json())
    samples = again.samples_of("x", 1.0, 2.0, margin=0.0)
    assert [s.t for s in samples] == [1.0, 2.0]
    assert samples[0].temperature_c == 30.0
    assert samples[1].energy_j == 2.0
    assert again.samples_of("y", 0.0, 9.0) == []
    assert len(again.to_samples()) == 2, "a malformed row is skipped"


async def test_an_attempt_sampled_with_the_named_reader_ships_its_gpus() -> None:
    spec = NodeTelemetry(interval_s=0.02, detail_s=0.1, reader=READER)
    sampling = AttemptSampling.start(spec, ["GPU-1", "GPU-2"])
    assert sampling is not None
    try:
        start = time.time()
        await anyio.sleep(0.3)
        exited = time.time()
        shipped = await sampling.finish(exited)
    finally:
        sampling.stop()
    assert shipped.gpus == ["GPU-1", "GPU-2"]
    assert {s.gpu for s in shipped.to_samples()} == {"GPU-1", "GPU-2"}
    assert max(s.t for s in shipped.to_samples()) >= exited, "sampled past the exit"
    one = shipped.samples_of("GPU-1", start, exited)
    assert one
    assert all(s.power_w == 100.0 for s in one)


def test_no_sampling_when_off_without_gpus_or_without_a_reader() -> None:
    assert AttemptSampling.start(None, ["0"]) is None
    assert AttemptSampling.start(NodeTelemetry(enabled=False, reader=READER), ["0"]) is None
    assert AttemptSampling.start(NodeTelemetry(reader=READER), []) is None
    # No NVML here (CI): auto telemetry on a virtual GPU is quietly off.
    assert AttemptSampling.start(NodeTelemetry(), ["0"]) is None


def test_node_telemetry_travels_as_plain_data() -> None:
    spec = NodeTelemetry(enabled=True, interval_s=0.5, detail_s=1.0, reader=READER)
    assert NodeTelemetry.from_wire(json.loads(json.dumps(spec.to_wire()))) == spec
    assert NodeTelemetry.from_wire(None) is None


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("llem_dispatch.testing", "is not `module:factory`"),
        ("no_such_module_here:f", "cannot import"),
        ("llem_dispatch.testing:no_such_factory", "has no callable"),
    ],
)
def test_a_bad_reader_path_is_a_clear_config_error(path: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        load_reader_factory(path)
    assert READER_ENV in caught.value.fix_suggestion


def test_the_study_hands_its_telemetry_and_the_test_switch_to_the_nodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    study = Study.model_validate(
        {"name": "n", "grid": {"x": [1]}, "telemetry": {"interval_s": 0.5}}
    )
    monkeypatch.delenv(READER_ENV, raising=False)
    assert node_telemetry(study) == NodeTelemetry(interval_s=0.5, detail_s=0.5)
    monkeypatch.setenv(READER_ENV, READER)
    assert node_telemetry(study) == NodeTelemetry(interval_s=0.5, detail_s=0.5, reader=READER)
    off = study.model_copy(
        update={"telemetry": study.telemetry.model_copy(update={"enabled": False})}
    )
    assert node_telemetry(off) is None
    monkeypatch.setenv(READER_ENV, "nope")
    with pytest.raises(ConfigError):
        node_telemetry(study)
    assert isinstance(load_reader_factory(READER)(["a"]), ConstantPowerReader)
