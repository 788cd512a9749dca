"""What a run leaves behind: the RunRecord, its error info, and the dispatcher's events."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llem_dispatch._logging import redact, truncate
from llem_dispatch.errors import LlemError
from llem_dispatch.gpu.attempt_telemetry import AttemptTelemetry
from llem_dispatch.models import ExperimentFailure

__all__ = [
    "ErrorInfo",
    "Event",
    "ExperimentFailed",
    "ExperimentFinished",
    "ExperimentQueued",
    "ExperimentRetried",
    "ExperimentStarted",
    "GpuAtStart",
    "NodeInfo",
    "RecordDraft",
    "RunRecord",
    "RunStatus",
]

RunStatus = Literal["succeeded", "failed", "error", "cancelled"]


class ErrorInfo(BaseModel):
    """An infrastructure error, as recorded (the exception itself is not serialisable)."""

    type: str
    message: str
    fix_suggestion: str | None = None
    stderr_snippet: str | None = None
    exit_code: int | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        if isinstance(exc, LlemError):
            payload = exc.to_payload()
            snippet = payload.get("stderr_snippet")
            return cls(
                type=payload["type"],
                message=_bounded(payload["message"]),
                fix_suggestion=payload["fix_suggestion"],
                stderr_snippet=_bounded(snippet) if snippet else None,
                exit_code=payload.get("exit_code"),
            )
        return cls(type=type(exc).__name__, message=_bounded(str(exc) or repr(exc)))


def _bounded(text: str) -> str:
    """Redacted, and cut to head and tail past 64 KiB: what a record may hold."""
    return truncate(redact(text))


class NodeInfo(BaseModel):
    """The cluster node an experiment ran on (cluster runs only)."""

    hostname: str
    node_id: str = Field(description="Ray node id (Slurm: the node's name).")
    ip: str | None = None

    @property
    def label(self) -> str:
        """Short and unique: 'host[1a2b3c]' (several nodes may share a hostname)."""
        return f"{self.hostname}[{self.node_id[:6]}]"


class GpuAtStart(BaseModel):
    """One GPU of a run as it was handed to it: which device, and its thermal state."""

    id: str
    uuid: str | None = None
    name: str | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    settle_wait_s: float | None = Field(
        default=None, description="Seconds from its last release to this hand-on."
    )
    settled: bool | None = Field(
        default=None, description="With a thermal gate: False when `max_s` ran out first."
    )


class RunRecord(BaseModel):
    """Everything known about one experiment's run: outcome, where, when, how often."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config_hash: str
    config: dict[str, Any]
    status: RunStatus
    result: dict[str, Any] | None = None
    failure: ExperimentFailure | None = None
    error: ErrorInfo | None = None
    gpu_ids: list[str] = Field(default_factory=list)
    runner_type: str | None = None
    image: str | None = None
    image_digest: str | None = None
    engine: str | None = Field(
        default=None,
        description='The container engine that ran it, with its URL ("Podman at '
        'unix:///..."); None for a local process.',
    )
    container_id: str | None = None
    process_id: int | None = None
    exchange_dir: str | None = None
    log_path: str | None = None
    queued_at: datetime
    started_at: datetime | None = None
    exited_at: datetime | None = None
    ended_at: datetime | None = None
    attempts: int = 0
    handoff_gap_s: float | None = Field(
        default=None,
        description="Seconds from the last release of these GPUs to this run's start.",
    )
    gpu_uuids: list[str] = Field(
        default_factory=list, description="The GPUs' UUIDs where NVML knows them (real GPUs)."
    )
    gpu_name: str | None = Field(default=None, description="The GPUs' model, per NVML.")
    gpu_request: str | None = Field(
        default=None,
        description="How the run was given its GPUs: `cdi` (the engine named them by UUID), "
        "`nvidia` (NVIDIA device requests) or `env` (visibility variables only).",
    )
    gpus_at_start: list[GpuAtStart] = Field(
        default_factory=list,
        description="Per GPU: UUID, model, temperature and power at start, settle wait.",
    )
    prestarted: bool = Field(
        default=False,
        description="Started before its GPUs were free, held at a gate until they were.",
    )
    gate_opened_at: datetime | None = Field(
        default=None,
        description="Prestarted runs: when the gate opened (the measured window's start).",
    )
    # -- the GPU's idle gap inside the run (issue 28): prepare, gate, first work --
    prepare_s: float | None = Field(
        default=None,
        description="Seconds from the experiment's start to ready: its prepare part "
        "(a generator function's, before its first `yield`) or its imports.",
    )
    gate_wait_s: float | None = Field(
        default=None,
        description="Prestarted runs: seconds from ready to the gate's opening.",
    )
    gate_to_work_s: float | None = Field(
        default=None,
        description="Seconds from the gate (or the start, if not prestarted) to the first "
        "measured work (the experiment's `work` mark): the GPU idle inside the run.",
    )
    work_started_at: datetime | None = Field(
        default=None, description="When the first measured work began (the `work` mark)."
    )
    work_ended_at: datetime | None = Field(
        default=None,
        description="When its work ended (the experiment's `done` mark), before its "
        "process exited: the GPUs' cooldown counts from here.",
    )
    ready_rss_bytes: int | None = Field(
        default=None, description="The experiment's resident memory when it was ready."
    )
    prestart_held: str | None = Field(
        default=None,
        description="Why a run that could have been prestarted was not (`memory`: the "
        "host had less available than `prestart_memory_reserve`).",
    )
    gate_late_s: float | None = Field(
        default=None,
        description="Prestarted runs: seconds from its gate's opening to its `ready` mark "
        "(its GPU waited for its preparation); 0 when it was ready first.",
    )
    # -- what shared its host while it measured (issue 33) --
    cpus: list[int] = Field(
        default_factory=list, description="The host cores it measured on (empty: not pinned)."
    )
    isolation: str | None = Field(
        default=None,
        description="`prepare_during_measurement` on its host: `pause` (preparing runs "
        "were frozen during its measured window) or `run`.",
    )
    window_prepare_overlap_s: float | None = Field(
        default=None,
        description="Neighbour-seconds of other experiments' preparation (not paused) "
        "inside its measured window (`quiet` or gate to `done`, or to its exit).",
    )
    window_work_overlap_s: float | None = Field(
        default=None,
        description="Neighbour-seconds of other experiments' measured windows inside its own.",
    )
    neighbours_paused_s: float | None = Field(
        default=None, description="Neighbour-seconds held paused during its measured window."
    )
    window_disturbed: bool | None = Field(
        default=None,
        description="True when unpaused preparation overlapped its measured window.",
    )
    tags: dict[str, Any] = Field(default_factory=dict)
    node: NodeInfo | None = Field(
        default=None,
        description="Cluster runs: the node that ran it (and holds a failure's exchange dir).",
    )
    job_id: str | None = Field(
        default=None,
        description="Batch-scheduler runs: the job (Slurm: JOBID, or JOBID.STEP in an "
        "allocation) of the attempt that made this record.",
    )
    node_telemetry: AttemptTelemetry | None = Field(
        default=None,
        exclude=True,
        repr=False,
        description="Placements that run it elsewhere (Ray, Slurm): its GPUs' samples taken "
        "there; the study turns them into the record's `telemetry` block and its file.",
    )
    outcome: Any = Field(default=None, exclude=True, repr=False)
    exception: Any = Field(default=None, exclude=True, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    @property
    def duration_s(self) -> float | None:
        if self.started_at and self.ended_at:
            return (self.ended_at - self.started_at).total_seconds()
        return None


@dataclass(slots=True)
class RecordDraft:
    """One run's record while it runs: the dispatcher and its placement fill it in.

    Mutable and cheap to update from observers and placements; `build` makes the
    `RunRecord` once, at the end. The fields are the `RunRecord`'s.
    """

    config_hash: str
    config: dict[str, Any]
    queued_at: datetime
    tags: dict[str, Any] = field(default_factory=dict)
    runner_type: str | None = None
    status: RunStatus = "error"
    attempts: int = 0
    gpu_ids: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    failure: ExperimentFailure | None = None
    error: ErrorInfo | None = None
    image: str | None = None
    image_digest: str | None = None
    engine: str | None = None
    container_id: str | None = None
    process_id: int | None = None
    exchange_dir: str | None = None
    log_path: str | None = None
    started_at: datetime | None = None
    exited_at: datetime | None = None
    ended_at: datetime | None = None
    handoff_gap_s: float | None = None
    gpu_uuids: list[str] = field(default_factory=list)
    gpu_name: str | None = None
    gpu_request: str | None = None
    gpus_at_start: list[GpuAtStart] = field(default_factory=list)
    prestarted: bool = False
    gate_opened_at: datetime | None = None
    prepare_s: float | None = None
    gate_wait_s: float | None = None
    gate_to_work_s: float | None = None
    work_started_at: datetime | None = None
    ready_rss_bytes: int | None = None
    work_ended_at: datetime | None = None
    prestart_held: str | None = None
    gate_late_s: float | None = None
    cpus: list[int] = field(default_factory=list)
    isolation: str | None = None
    window_prepare_overlap_s: float | None = None
    window_work_overlap_s: float | None = None
    neighbours_paused_s: float | None = None
    window_disturbed: bool | None = None
    node: NodeInfo | None = None
    job_id: str | None = None
    node_telemetry: AttemptTelemetry | None = None
    outcome: Any = None
    exception: BaseException | None = None

    def build(self) -> RunRecord:
        """The finished `RunRecord` (built without re-validating what is already typed)."""
        return RunRecord.model_construct(**{name: getattr(self, name) for name in _DRAFT_FIELDS})


_DRAFT_FIELDS = tuple(f.name for f in fields(RecordDraft))


# -- events -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExperimentQueued:
    config_hash: str
    gpus: int
    tags: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExperimentStarted:
    config_hash: str
    gpu_ids: tuple[str, ...]
    attempt: int
    container_id: str | None
    process_id: int | None
    tags: Mapping[str, Any] = field(default_factory=dict)
    node: str | None = None


@dataclass(frozen=True, slots=True)
class ExperimentRetried:
    config_hash: str
    attempt: int
    delay_s: float
    error: str
    tags: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExperimentFinished:
    record: RunRecord


@dataclass(frozen=True, slots=True)
class ExperimentFailed:
    record: RunRecord


Event = (
    ExperimentQueued | ExperimentStarted | ExperimentRetried | ExperimentFinished | ExperimentFailed
)
