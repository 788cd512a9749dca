"""One attempt's files on the shared filesystem, and how its end is read from them.

An attempt dir (`RESULTS/slurm/<hash>-<token>/`) holds `spec.json` for the job,
`started.json` and `outcome.json` from it, and Slurm's own output file. The
ledger (`RESULTS/slurm/jobs.jsonl`, fsynced lines) names every job the study
submitted and how each ended, so a resumed run adopts jobs still queued or
running instead of submitting them again. How a job's end maps onto our errors
is here too, from Slurm's state first and the job's own outcome file second.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from llem_dispatch.dispatch import GpuAtStart, NodeInfo, RecordDraft
from llem_dispatch.dispatch.attempt import AttemptReport
from llem_dispatch.errors import (
    ClusterJobCancelledError,
    ClusterNodeLostError,
    ExperimentExitError,
    ExperimentOOMError,
    ExperimentTimeoutError,
    LlemError,
    ResultError,
)
from llem_dispatch.models import ExperimentFailure
from llem_dispatch.runners.protocol import Outcome
from llem_dispatch.slurm.job import OUTCOME_FILE, SPEC_FILE, STARTED_FILE, write_json

__all__ = ["Attempt", "Ledger", "fill_started", "outcome_of", "read_json"]

#: Slurm ends that say nothing about the experiment: run it again (the retry policy).
_LOST = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "REVOKED"}
_TIMED_OUT = {"TIMEOUT", "DEADLINE"}


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object written atomically, or None while it is not there."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(slots=True)
class Attempt:
    """One job (or job step) of one experiment, and its folder."""

    folder: Path
    config_hash: str
    job_id: str | None = None
    #: Set once we asked Slurm to cancel it (so CANCELLED is ours, not someone's).
    cancelled_by_us: bool = False
    adopted: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, base: Path, config_hash: str) -> Attempt:
        """A fresh attempt dir under `base`."""
        folder = base / f"{config_hash}-{secrets.token_hex(4)}"
        folder.mkdir(parents=True, mode=0o700)
        return cls(folder, config_hash)

    def write_spec(self, spec: Mapping[str, Any]) -> None:
        """What the job reads: the config, the cooldown, the thermal gate, the factory."""
        write_json(self.folder / SPEC_FILE, spec)

    @property
    def started(self) -> dict[str, Any] | None:
        """What the job wrote as it began (None before)."""
        return read_json(self.folder / STARTED_FILE)

    @property
    def outcome(self) -> dict[str, Any] | None:
        """What the job wrote as it ended (None before, or when it was killed)."""
        return read_json(self.folder / OUTCOME_FILE)

    def log_tail(self, lines: int = 20) -> str | None:
        """The end of Slurm's output file(s) for this attempt."""
        texts = [p.read_text(errors="replace") for p in sorted(self.folder.glob("slurm-*.out"))]
        text = "".join(texts).strip()
        return "\n".join(text.splitlines()[-lines:]) if text else None


def fill_started(draft: RecordDraft, attempt: Attempt, node: str | None) -> None:
    """The draft as the job began: its node, job id, and the GPUs it saw."""
    started = attempt.started or {}
    host = started.get("node") or node
    if host:
        draft.node = NodeInfo(hostname=str(host).split(",")[0], node_id=str(host))
    step = started.get("step_id")
    job = started.get("job_id") or attempt.job_id
    draft.job_id = f"{job}.{step}" if job and step not in {None, "", "batch"} else job
    draft.gpu_ids = [str(g) for g in started.get("gpu_ids", [])]
    draft.gpu_uuids = [str(u) for u in started.get("gpu_uuids", [])]
    draft.gpus_at_start = [GpuAtStart(**g) for g in started.get("gpus_at_start", [])]
    draft.process_id = started.get("pid")
    if isinstance(started.get("started_at"), int | float):
        draft.started_at = datetime.fromtimestamp(started["started_at"], UTC)
    draft.exchange_dir = str(attempt.folder)


def _fill_ended(draft: RecordDraft, info: Mapping[str, Any]) -> None:
    AttemptReport.from_wire(info.get("report")).fill(draft)


def outcome_of(
    attempt: Attempt,
    state: str,
    draft: RecordDraft,
    result_model: type[BaseModel],
) -> Outcome:
    """The attempt's outcome once its job has ended in `state`; our error otherwise."""
    where = f"Slurm job {attempt.job_id}" + (f" on {draft.node.hostname}" if draft.node else "")
    context: dict[str, Any] = {
        "config_hash": attempt.config_hash,
        "exchange_dir": str(attempt.folder),
    }
    if state in _LOST:
        raise ClusterNodeLostError(
            f"{where} ended {state}: its node failed or it was preempted",
            fix_suggestion="Nothing to do if a retry succeeded; otherwise see `scontrol show "
            "node` and run the study again with --resume.",
            **context,
        )
    if state in _TIMED_OUT:
        raise ExperimentTimeoutError(
            f"{where} ran past its Slurm time limit ({state})",
            fix_suggestion="Raise `slurm: {time_limit: ...}` or the study's timeout_s.",
            stderr_snippet=attempt.log_tail(),
            **context,
        )
    if state == "OUT_OF_MEMORY":
        raise ExperimentOOMError(
            f"{where} was killed for using more memory than it asked for (OUT_OF_MEMORY)",
            fix_suggestion="Ask for more memory (`slurm: {mem: 64G}`) or use a smaller config.",
            stderr_snippet=attempt.log_tail(),
            **context,
        )
    if state == "CANCELLED" and not attempt.cancelled_by_us:
        raise ClusterJobCancelledError(f"{where} was cancelled from outside", **context)
    message = attempt.outcome
    if message is None:
        raise ExperimentExitError(
            f"{where} ended {state} without writing its outcome",
            fix_suggestion="Read the job's output (kept in the exchange dir): the job could "
            "not start Python, or the results dir is not on a shared filesystem.",
            stderr_snippet=attempt.log_tail(),
            **context,
        )
    _fill_ended(draft, message.get("info", {}))
    kind = message.get("kind")
    if kind == "error":
        raise LlemError.from_payload(message["error"], suffix=f" [{where}]")
    if kind == "cancelled":
        raise ClusterJobCancelledError(f"{where} was stopped (SIGTERM) mid-run", **context)
    try:
        if kind == "failure":
            return ExperimentFailure.model_validate(message["failure"])
        return result_model.model_validate(message.get("result"))
    except ValidationError as exc:
        raise ResultError(
            f"the result of {where} does not match {result_model.__name__}: {exc}",
            config_hash=attempt.config_hash,
        ) from exc


class Ledger:
    """The study's Slurm jobs, one fsynced JSON line per submission and per end."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _append(self, entry: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def submitted(self, attempt: Attempt, gpus: int) -> None:
        """A job was submitted (written before anything waits on it)."""
        self._append(
            {
                "event": "submitted",
                "job_id": attempt.job_id,
                "config_hash": attempt.config_hash,
                "folder": str(attempt.folder),
                "gpus": gpus,
                "at": datetime.now(UTC).isoformat(),
            }
        )

    def ended(self, attempt: Attempt, state: str) -> None:
        """A job's end was read (its outcome now belongs to a record)."""
        self._append({"event": "ended", "job_id": attempt.job_id, "state": state})

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every line so far (a torn last line, from a kill mid-write, is skipped)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                yield entry

    def open_jobs(self) -> list[Attempt]:
        """Jobs submitted whose end was never read (the driver died before)."""
        submitted: dict[str, Attempt] = {}
        for entry in self.entries():
            job_id = str(entry.get("job_id"))
            if entry.get("event") == "submitted":
                folder = Path(str(entry["folder"]))
                submitted[job_id] = Attempt(folder, str(entry["config_hash"]), job_id)
            elif entry.get("event") == "ended":
                submitted.pop(job_id, None)
        return list(submitted.values())
