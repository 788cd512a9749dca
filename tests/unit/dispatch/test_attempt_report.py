"""The one attempt report: what every placement carries from the runner into the record."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

from llem_dispatch.dispatch.attempt import _FIELDS, AttemptReport
from llem_dispatch.dispatch.records import RecordDraft, RunRecord
from llem_dispatch.runners.protocol import PhaseTimes, RunInfo


def _info() -> RunInfo:
    info = RunInfo(
        config_hash="abcd",
        gpu_ids=("GPU-1",),
        exchange_dir="/tmp/x",
        log_path="/tmp/x/container.log",
        runner_type="docker",
        image="img:1",
        image_digest="sha256:1",
        engine="Podman at unix:///run/llem-podman/podman.sock",
        container_id="c1",
        gpu_request="cdi",
    )
    info.started_at = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
    info.exited_at = datetime(2026, 12, 7, 10, 1, tzinfo=UTC)
    info.phases = PhaseTimes(
        prepare_s=3.0,
        gate_wait_s=1.0,
        gate_to_work_s=0.5,
        work_started_at=datetime(2026, 12, 7, 10, 0, 1, tzinfo=UTC),
        ready_rss_bytes=123,
        work_ended_at=datetime(2026, 12, 7, 10, 0, 59, tzinfo=UTC),
        gate_late_s=0.0,
    )
    return info


def test_every_phase_and_run_fact_reaches_the_record_through_the_wire() -> None:
    wire = json.loads(json.dumps(AttemptReport.of(_info()).to_wire()))  # as Ray or Slurm carry it
    draft = RecordDraft(config_hash="abcd", config={}, queued_at=datetime.now(UTC))
    AttemptReport.from_wire(wire).fill(draft)
    record = draft.build()
    assert record.prepare_s == 3.0
    assert record.gate_to_work_s == 0.5
    assert record.work_ended_at == datetime(2026, 12, 7, 10, 0, 59, tzinfo=UTC)
    assert record.ready_rss_bytes == 123
    assert record.engine == "Podman at unix:///run/llem-podman/podman.sock"
    assert (record.image_digest, record.container_id, record.gpu_request) == (
        "sha256:1",
        "c1",
        "cdi",
    )


def test_no_phase_or_record_field_is_left_out_of_the_report() -> None:
    """A field added to the phases must travel, and land in a record field: a new
    placement cannot forget it, since it only carries the report."""
    phases = {f.name for f in dataclasses.fields(PhaseTimes)}
    assert phases <= set(AttemptReport.model_fields)
    assert phases <= set(_FIELDS)
    assert set(_FIELDS) <= set(RunRecord.model_fields)
    assert set(_FIELDS) <= {f.name for f in dataclasses.fields(RecordDraft)}


def test_a_missing_fact_leaves_what_the_placement_wrote() -> None:
    draft = RecordDraft(config_hash="abcd", config={}, queued_at=datetime.now(UTC))
    draft.exchange_dir = "/shared/attempt"
    AttemptReport.from_wire(None).fill(draft)
    assert draft.exchange_dir == "/shared/attempt"


def test_a_local_run_names_no_engine() -> None:
    info = RunInfo(
        config_hash="abcd",
        gpu_ids=(),
        exchange_dir="/tmp/x",
        log_path="/tmp/x/process.log",
        runner_type="local",
    )
    draft = RecordDraft(config_hash="abcd", config={}, queued_at=datetime.now(UTC))
    AttemptReport.from_wire(AttemptReport.of(info).to_wire()).fill(draft)
    assert draft.build().engine is None
    assert "engine" in _FIELDS
