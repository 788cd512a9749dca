"""The results dir: journal, one record per experiment, summary, and resume.

Survives crashes: the journal is append-only and fsynced at every completion,
records are written atomically, and resume skips what already succeeded.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from llem_dispatch._exchange import atomic_write
from llem_dispatch.dispatch import RunRecord
from llem_dispatch.errors import ConfigError, ResultsDirBusyError
from llem_dispatch.study.adaptive import Unresolved
from llem_dispatch.study.schema import Experiment, Study

__all__ = ["Journal", "ResultsDir", "StudySummary", "completed_keys", "iter_records"]


class StudySummary(BaseModel):
    """How a study run ended."""

    name: str
    results_dir: str
    total: int
    succeeded: int
    failed: int
    errored: int
    skipped: int
    interrupted: bool = False
    stopped: str | None = Field(
        default=None,
        description="Why the study stopped dispatching early (a hung engine, e.g. the "
        "Docker daemon); what did not run is left for --resume.",
    )
    stopped_fix: str | None = Field(
        default=None, description="What to do about what stopped it (the error's own fix)."
    )
    duration_s: float
    runner: str
    unresolved: list[Unresolved] = Field(
        default_factory=list,
        description="Adaptive cycles: configs that ended at `max` (or kept failing) with "
        "their CI outside the target.",
    )
    telemetry: dict[str, Any] | None = Field(
        default=None,
        description="GPU telemetry: its file in the results dir, samples, and the "
        "sampler's CPU cost (cpu_s, cpu_share of one core, cpu_ms_per_read).",
    )
    records: list[RunRecord] = Field(default_factory=list, exclude=True)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.failed == 0 and self.errored == 0 and not self.stopped else 1


class Journal:
    """Append-only JSON lines; completions are fsynced so a crash loses only in-flight runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a+b")  # noqa: SIM115 - closed in close()
        end = self._file.seek(0, os.SEEK_END)
        if end:
            self._file.seek(end - 1)
            if self._file.read(1) != b"\n":
                # A torn last line (power loss mid-write): never glue the next event to it.
                self._file.write(b"\n")

    def write(self, event: str, *, sync: bool = False, **fields: Any) -> None:
        line = {"ts": time.time(), "event": event, **fields}
        self._file.write((json.dumps(line, default=str, sort_keys=True) + "\n").encode())
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _atomic_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str, sort_keys=True)
    atomic_write(path, text.encode("utf-8"), mode=0o644)


def completed_keys(results_dir: Path) -> set[str]:
    """Keys ('{hash}_c{cycle}') that already have a successful record."""
    done: set[str] = set()
    records = results_dir / "records"
    if not records.is_dir():
        return done
    for path in records.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("status") == "succeeded":
            done.add(path.stem)
    return done


def iter_records(results_dir: Path) -> Iterator[dict[str, Any]]:
    """Every record file of a results dir, parsed."""
    for path in sorted((results_dir / "records").glob("*.json")):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            yield json.loads(path.read_text())


MARKER_NAME = ".llem-results"
LOCK_NAME = ".llem-lock"
#: Files an llem-dispatch results dir from before the marker existed always has.
_LEGACY_SIGNS = ("journal.jsonl", "study.json")


class ResultsDir:
    """A study's results dir, held exclusively by one run from `open` to `close`.

    The lock is an OS lock (flock) on a file inside the dir: the kernel drops it
    when the process dies, so a SIGKILLed run never blocks `--resume`. The tool
    only writes into a dir it made or one that is already an llem-dispatch
    results dir; anything else is refused, never overwritten.
    """

    def __init__(self, path: Path, lock: int, *, created: bool) -> None:
        self.path = path
        self.records = path / "records"
        self.exchange = path / "exchange"
        self._lock = lock
        self._created = created
        self._journal: Journal | None = None

    @classmethod
    def open(cls, path: str | Path, *, resume: bool) -> ResultsDir:
        """Take the results dir for one run; `ConfigError` / `ResultsDirBusyError` if not ours."""
        path = Path(path).resolve()
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"results dir {path} is a file, not a directory",
                fix_suggestion="Give --results a directory (new, or one written by llem-dispatch).",
            )
        created = not path.exists()
        if not created and any(path.iterdir()) and not is_results_dir(path):
            raise ConfigError(
                f"{path} is not empty and is not an llem-dispatch results dir; "
                "refusing to write into it",
                fix_suggestion="Give --results a new or empty directory (or one written "
                "by llem-dispatch).",
            )
        path.mkdir(parents=True, exist_ok=True)
        lock = _take_lock(path / LOCK_NAME)
        try:
            if (path / "records").is_dir() and any((path / "records").iterdir()) and not resume:
                raise ConfigError(
                    f"results dir {path} already holds records",
                    fix_suggestion="Pass resume=True / --resume to continue it, or use a new dir.",
                )
            (path / MARKER_NAME).touch()
        except BaseException:
            os.close(lock)
            raise
        return cls(path, lock, created=created)

    def start(self) -> Journal:
        """Make the folders and open the journal: from here on, the run is on record."""
        self.exchange.mkdir(exist_ok=True, mode=0o700)
        self.records.mkdir(exist_ok=True)
        self._journal = Journal(self.path / "journal.jsonl")
        return self._journal

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise RuntimeError("ResultsDir.start() has not been called")
        return self._journal

    def completed_keys(self) -> set[str]:
        return completed_keys(self.path)

    def done_keys(self, study: Study, experiments: list[Experiment]) -> set[str]:
        """Keys of this study already succeeded: records of configs no longer in it are
        neither skipped nor run; an adaptive study's later cycles count too."""
        done = self.completed_keys()
        if study.adaptive is None:
            return done & {e.key for e in experiments}
        hashes = {e.config_hash for e in experiments}
        later = range(study.min_cycles + 1, study.max_cycles + 1)
        return done & ({e.key for e in experiments} | {f"{h}_c{c}" for h in hashes for c in later})

    def record(self, exp: Experiment, record: RunRecord, extra: dict[str, Any]) -> dict[str, Any]:
        """One experiment's record file, then its journal line (fsynced); the record's payload."""
        payload = {**record.model_dump(mode="json"), **extra}
        payload["cycle"] = exp.cycle
        payload["key"] = exp.key
        self.write_record(exp.key, payload)
        self.journal.write(
            record.status,
            sync=True,
            key=exp.key,
            config_hash=exp.config_hash,
            cycle=exp.cycle,
            gpu_ids=record.gpu_ids,
            error=record.error.type if record.error else None,
            exchange_dir=record.exchange_dir,
            **({"node": record.node.label} if record.node else {}),
        )
        return payload

    def write_json(self, name: str, data: Any) -> None:
        """A file of the results dir (study.json, summary.json), written atomically."""
        _atomic_json(self.path / name, data)

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path / name, text.encode("utf-8"), mode=0o644)

    def write_record(self, key: str, payload: dict[str, Any]) -> None:
        _atomic_json(self.records / f"{key}.json", payload)

    def close(self) -> None:
        """Release the lock; a dir this run made but never started is removed again."""
        if self._journal is not None:
            self._journal.close()
        elif self._created:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> ResultsDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_results_dir(path: Path) -> bool:
    """Whether `path` was written by llem-dispatch (marker, or an older run's files)."""
    return (path / MARKER_NAME).exists() or any((path / n).exists() for n in _LEGACY_SIGNS)


def _take_lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise ResultsDirBusyError(
            f"results dir {path.parent} is in use by another llem-dispatch run ({holder})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": since}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
