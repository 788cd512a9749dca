"""The live display: an overall bar with counts and ETA, one line per GPU."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from llem_dispatch.dispatch import (
    Event,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentQueued,
    ExperimentRetried,
    ExperimentStarted,
)
from llem_dispatch.study import Experiment, completed_keys

__all__ = ["LiveDisplay", "ProgressState", "resumed_count"]


def resumed_count(experiments: Iterable[Experiment], results_dir: Path) -> int:
    """How many of a study's experiments `--resume` skips: known before anything runs.

    Only this study's keys count: records of configs since removed from the study
    are not part of its total.
    """
    done = completed_keys(results_dir)
    return sum(e.key in done for e in experiments)


@dataclass
class _Slot:
    key: str
    started: float


def _slot_names(node: str | None, gpu_ids: Iterable[str]) -> list[str]:
    """Display names of GPUs: 'host:0' on a cluster, where ids repeat across nodes."""
    return [f"{node}:{gpu}" if node else gpu for gpu in gpu_ids]


@dataclass
class ProgressState:
    """What the live display shows; fed by dispatcher events."""

    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    running: dict[str, _Slot] = field(default_factory=dict)  # gpu id (or '-') -> slot
    cpu_running: dict[str, _Slot] = field(default_factory=dict)
    gpu_ids: list[str] = field(default_factory=list)
    recent_failures: list[str] = field(default_factory=list)

    @property
    def queued(self) -> int:
        return max(0, self.total - self.skipped - self.done - self.failed - self.in_flight)

    @property
    def in_flight(self) -> int:
        return len({s.key for s in self.running.values()}) + len(self.cpu_running)

    def apply(self, event: Event) -> str | None:
        """Update from one event; return a plain log line for non-terminal output."""
        now = time.monotonic()
        match event:
            case ExperimentStarted():
                key = str(event.tags.get("key", event.config_hash))
                slots = _slot_names(event.node, event.gpu_ids)
                if slots:
                    for slot in slots:
                        self.running[slot] = _Slot(key, now)
                else:
                    self.cpu_running[key] = _Slot(key, now)
                where = ",".join(slots) or "-"
                return f"started   {key} on GPU {where} (attempt {event.attempt})"
            case ExperimentFinished() | ExperimentFailed():
                record = event.record
                key = str(record.tags.get("key", record.config_hash))
                node = record.node.label if record.node is not None else None
                for slot in _slot_names(node, record.gpu_ids):
                    if slot in self.running and self.running[slot].key == key:
                        del self.running[slot]
                self.cpu_running.pop(key, None)
                if record.ok:
                    self.done += 1
                    return f"done      {key} in {record.duration_s or 0:.2f}s"
                self.failed += 1
                what = (
                    record.error.type
                    if record.error
                    else (record.failure.type if record.failure else record.status)
                )
                self.recent_failures = [*self.recent_failures[-2:], f"{key}: {what}"]
                return f"FAILED    {key}: {what}"
            case ExperimentRetried():
                key = str(event.tags.get("key", event.config_hash))
                return f"retry     {key} in {event.delay_s:.1f}s after {event.error}"
            case ExperimentQueued():
                return None
        return None


class LiveDisplay:
    """rich renderable: an overall bar with counts and ETA, then one line per GPU."""

    def __init__(self, state: ProgressState) -> None:
        self.state = state
        self.progress = Progress(
            BarColumn(bar_width=None),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TextColumn("elapsed · ETA"),
            TimeRemainingColumn(),
            expand=True,
        )
        self.task = self.progress.add_task("study", total=state.total, completed=state.skipped)

    def __rich__(self) -> Group:
        s = self.state
        # Each number before its word, on a line of its own: "12 done · 0 failed",
        # never "12/12 done 12 failed 0" (which reads as "12 failed").
        pairs = [
            f"[green]{s.done} done[/]",
            f"[red]{s.failed} failed[/]" if s.failed else f"{s.failed} failed",
            f"[yellow]{s.in_flight} running[/]",
            f"{s.queued} queued",
        ]
        if s.skipped:
            pairs.append(f"{s.skipped} skipped (done before)")
        counts = Text.from_markup(" · ".join(pairs))
        self.progress.update(self.task, completed=s.skipped + s.done + s.failed)
        table = Table.grid(padding=(0, 2))
        now = time.monotonic()
        # On a cluster the GPUs are only known once experiments land on them.
        for gpu in [*s.gpu_ids, *(k for k in s.running if k not in s.gpu_ids)]:
            slot = s.running.get(gpu)
            if slot is None:
                table.add_row(f"GPU {gpu}", Text("idle", style="dim"), "")
            else:
                table.add_row(f"GPU {gpu}", slot.key, f"{now - slot.started:6.1f}s")
        for key, slot in list(s.cpu_running.items())[:8]:
            table.add_row("CPU", key, f"{now - slot.started:6.1f}s")
        parts: list[Any] = [self.progress, counts, table]
        for line in s.recent_failures:
            parts.append(Text(f"failed: {line}", style="red"))
        return Group(*parts)
