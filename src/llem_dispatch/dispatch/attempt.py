"""One attempt's own facts, as every placement carries them: `AttemptReport`, one wire format.

A runner's `RunInfo` (its ids, times, image, and its phases once it has exited)
becomes an `AttemptReport` where the attempt ran (this host, a Ray node, a Slurm
job); it travels as JSON (`to_wire` / `from_wire`) and `fill` is the one place it
goes into a record draft, so every placement records the same fields. Where the
attempt ran away from the driver, it carries the samples of its GPUs taken there
(`telemetry`), from which the study computes the record's energy as for a local run.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from llem_dispatch.dispatch.records import RecordDraft
from llem_dispatch.gpu.attempt_telemetry import AttemptTelemetry
from llem_dispatch.runners.protocol import RunInfo

__all__ = ["AttemptReport"]

#: The fields every record takes from the attempt's report (the rest is the placement's:
#: node, job, GPUs handed, gate, hand-off gap).
_FIELDS = (
    "runner_type",
    "image",
    "image_digest",
    "engine",
    "container_id",
    "process_id",
    "exchange_dir",
    "log_path",
    "gpu_request",
    "started_at",
    "exited_at",
    "prepare_s",
    "gate_wait_s",
    "gate_to_work_s",
    "work_started_at",
    "work_ended_at",
    "ready_rss_bytes",
    "gate_late_s",
)


class AttemptReport(BaseModel):
    """What the runner knew about one attempt, typed and serialisable (None: not known)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    runner_type: str | None = None
    image: str | None = None
    image_digest: str | None = None
    engine: str | None = None
    container_id: str | None = None
    process_id: int | None = None
    exchange_dir: str | None = None
    log_path: str | None = None
    gpu_request: str | None = None
    started_at: datetime | None = None
    exited_at: datetime | None = None
    exit_code: int | None = None
    prepare_s: float | None = None
    gate_wait_s: float | None = None
    gate_to_work_s: float | None = None
    work_started_at: datetime | None = None
    work_ended_at: datetime | None = None
    ready_rss_bytes: int | None = None
    gate_late_s: float | None = None
    #: Its GPUs' samples over the attempt, taken where it ran (Ray node, Slurm job).
    telemetry: AttemptTelemetry | None = None

    @classmethod
    def of(cls, info: RunInfo) -> AttemptReport:
        """The report of a run as its runner describes it now (phases once it exited)."""
        phases = info.phases
        return cls(
            runner_type=info.runner_type,
            image=info.image,
            image_digest=info.image_digest,
            engine=info.engine,
            container_id=info.container_id,
            process_id=info.process_id,
            exchange_dir=info.exchange_dir,
            log_path=info.log_path,
            gpu_request=info.gpu_request,
            started_at=info.started_at,
            exited_at=info.exited_at,
            exit_code=info.exit_code,
            prepare_s=phases.prepare_s if phases else None,
            gate_wait_s=phases.gate_wait_s if phases else None,
            gate_to_work_s=phases.gate_to_work_s if phases else None,
            work_started_at=phases.work_started_at if phases else None,
            work_ended_at=phases.work_ended_at if phases else None,
            ready_rss_bytes=phases.ready_rss_bytes if phases else None,
            gate_late_s=phases.gate_late_s if phases else None,
        )

    def to_wire(self) -> dict[str, Any]:
        """As JSON-ready data (a Ray message, a Slurm job's outcome file)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: Mapping[str, Any] | None) -> AttemptReport:
        """Back from `to_wire`'s data (an empty report for None)."""
        return cls.model_validate(dict(data or {}))

    def fill(self, draft: RecordDraft) -> None:
        """Into the record draft: every field it knows (a None leaves the draft's as it is)."""
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(draft, name, value)
        if self.telemetry is not None:
            draft.node_telemetry = self.telemetry

    def with_telemetry(self, telemetry: AttemptTelemetry | None) -> AttemptReport:
        """This report, carrying the samples taken where the attempt ran."""
        return self if telemetry is None else self.model_copy(update={"telemetry": telemetry})
