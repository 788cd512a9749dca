"""The per-GPU timeline of a study: one bar per attempt on each GPU, cooldowns, sessions.

Built from the journal (every attempt's start, retry and end, across resumes)
and the records (the exact exit of each final attempt). Also the numbers a
sweep's health is judged by: wall time, busy and cooldown GPU-seconds, utilisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from llem_dispatch.dispatch import NodeInfo
from llem_dispatch.report.data import StudyResults

__all__ = ["EXPERIMENT_KINDS", "Bar", "Session", "Timeline", "build_timeline"]

#: Bar kinds that are an experiment's last attempt (its outcome); the others are
#: "retried" (an attempt that failed and was retried), "unfinished", "cooldown" and
#: "before_work" (inside an experiment's bar: from its gate, or start, to its first
#: measured work, where the experiment marked one: the GPU idle inside the run).
EXPERIMENT_KINDS = ("succeeded", "failed", "error", "cancelled")
TERMINAL_EVENTS = frozenset(EXPERIMENT_KINDS)
SESSION_ENDS = frozenset({"study_finished", "interrupted", "crashed"})


@dataclass(frozen=True, slots=True)
class Bar:
    """One attempt of one experiment on one GPU (or a cooldown after it), epoch seconds."""

    key: str
    lane: str
    start: float
    end: float
    kind: str
    attempt: int
    session: int
    error: str | None = None

    @property
    def seconds(self) -> float:
        """The bar's length."""
        return max(0.0, self.end - self.start)


@dataclass(frozen=True, slots=True)
class Session:
    """One `run` of the study on this results dir (the first, or a `--resume`)."""

    index: int
    start: float
    end: float
    resumed: bool
    finished: bool


@dataclass(frozen=True)
class Timeline:
    """Bars by lane, the sessions they fall in, and the GPU count utilisation is over."""

    bars: list[Bar]
    sessions: list[Session]
    lanes: list[str]
    gpus: int | None
    retries: int = 0
    cpu_lanes: list[str] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        """Seconds the study's runs took, added up (the time between resumes not counted)."""
        return sum(max(0.0, s.end - s.start) for s in self.sessions)

    def _gpu_seconds(self, cooldown: bool) -> float:
        return sum(
            b.seconds
            for b in self.bars
            if b.lane not in self.cpu_lanes
            and b.kind != "before_work"
            and (b.kind == "cooldown") == cooldown
        )

    @property
    def before_work_gpu_s(self) -> float:
        """GPU-seconds inside experiments before their first measured work (marked ones)."""
        return sum(b.seconds for b in self.bars if b.kind == "before_work")

    @property
    def busy_gpu_s(self) -> float:
        """GPU-seconds with an experiment running (retried attempts included)."""
        return self._gpu_seconds(cooldown=False)

    @property
    def cooldown_gpu_s(self) -> float:
        """GPU-seconds held idle for the cooldown gap after experiments."""
        return self._gpu_seconds(cooldown=True)

    @property
    def utilisation(self) -> float | None:
        """Busy GPU-seconds / (GPUs x wall time); None without GPUs or time."""
        if not self.gpus or self.wall_s <= 0:
            return None
        return self.busy_gpu_s / (self.gpus * self.wall_s)


def _epoch(stamp: Any) -> float | None:
    if not stamp:
        return None
    return datetime.fromisoformat(str(stamp)).timestamp()


def _lanes(gpu_ids: list[Any], node: str | None) -> list[str]:
    return [f"{node}:{g}" if node else str(g) for g in gpu_ids]


def _split_sessions(journal: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    sessions: list[list[dict[str, Any]]] = []
    for event in journal:
        if event["event"] == "study_started" or not sessions:
            sessions.append([])
        sessions[-1].append(event)
    return sessions


@dataclass
class _Builder:
    """Walks the journal session by session; the records settle each final attempt."""

    records: Mapping[str, Mapping[str, Any]]
    bars: list[Bar] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    retries: int = 0
    last_session_of: dict[str, int] = field(default_factory=dict)

    def session(self, index: int, events: list[dict[str, Any]]) -> None:
        """The bars of one run (a `study_started` and the events up to the next one)."""
        starts: dict[tuple[str, int], dict[str, Any]] = {}
        retried: dict[tuple[str, int], dict[str, Any]] = {}
        ends: dict[str, dict[str, Any]] = {}
        for event in events:
            kind, key = event["event"], str(event.get("key"))
            if kind == "started":
                starts[(key, int(event.get("attempt") or 1))] = event
            elif kind == "retried":
                retried[(key, int(event.get("attempt") or 1))] = event
            elif kind in TERMINAL_EVENTS:
                ends[key] = event
        first, last = float(events[0]["ts"]), float(events[-1]["ts"])
        finished = any(e["event"] in SESSION_ENDS for e in events)
        resumed = bool(events[0].get("resume")) and events[0]["event"] == "study_started"
        self.sessions.append(Session(index, first, last, resumed, finished))
        self.retries += len(retried)
        for (key, attempt), event in starts.items():
            self._attempt(index, key, attempt, event, retried, ends, last)

    def _attempt(
        self,
        session: int,
        key: str,
        attempt: int,
        event: dict[str, Any],
        retried: dict[tuple[str, int], dict[str, Any]],
        ends: dict[str, dict[str, Any]],
        session_end: float,
    ) -> None:
        start, error = float(event["ts"]), None
        if (key, attempt) in retried:
            kind, end = "retried", float(retried[(key, attempt)]["ts"])
            error = retried[(key, attempt)].get("error")
        elif key in ends:
            kind, end = ends[key]["event"], float(ends[key]["ts"])
            error = ends[key].get("error")
            record = self.records.get(key)
            if record is not None and self.last_session_of.get(key) == session:
                # The record is this attempt's: it knows the exit, before the cleanup.
                end = _epoch(record.get("exited_at")) or end
                start = _epoch(record.get("started_at")) or start
                error = error or (record.get("failure") or {}).get("type")
        else:
            kind, end = "unfinished", session_end
        for lane in _lanes(event.get("gpu_ids") or [], event.get("node")) or [""]:
            self.bars.append(Bar(key, lane, start, max(start, end), kind, attempt, session, error))

    def from_record(self, key: str, record: Mapping[str, Any]) -> None:
        """A record the journal has no start for (an old results dir): its own times."""
        start = _epoch(record.get("started_at"))
        end = _epoch(record.get("exited_at")) or _epoch(record.get("ended_at"))
        if start is None or end is None:
            return
        node = NodeInfo.model_validate(record["node"]).label if record.get("node") else None
        for lane in _lanes(record.get("gpu_ids") or [], node) or [""]:
            self.bars.append(
                Bar(
                    key, lane, start, end, str(record.get("status")), record.get("attempts") or 1, 0
                )
            )


def _cpu_lanes(bars: list[Bar]) -> tuple[list[Bar], list[str]]:
    """Experiments without GPUs share lanes 'CPU 1', 'CPU 2'... without overlapping."""
    placed: list[Bar] = []
    lane_ends: list[float] = []
    for bar in sorted((b for b in bars if b.lane == ""), key=lambda b: b.start):
        index = next((i for i, end in enumerate(lane_ends) if end <= bar.start), len(lane_ends))
        if index == len(lane_ends):
            lane_ends.append(bar.end)
        lane_ends[index] = bar.end
        placed.append(_replace_lane(bar, f"CPU {index + 1}"))
    return [b for b in bars if b.lane != ""] + placed, [
        f"CPU {i + 1}" for i in range(len(lane_ends))
    ]


def _replace_lane(bar: Bar, lane: str) -> Bar:
    return Bar(bar.key, lane, bar.start, bar.end, bar.kind, bar.attempt, bar.session, bar.error)


def _cooldowns(
    bars: list[Bar],
    gap_s: float,
    sessions: list[Session],
    records: Mapping[str, Mapping[str, Any]],
) -> list[Bar]:
    """The per-GPU cooldown after each attempt, cut at the next start and the session end.

    It counts from the end of the attempt's work where the record has it (its `done`
    mark, before the process exited), as the pool counted it; else from its end.
    """
    out: list[Bar] = []
    by_lane: dict[str, list[Bar]] = {}
    for bar in sorted(bars, key=lambda b: b.start):
        by_lane.setdefault(bar.lane, []).append(bar)
    for lane_bars in by_lane.values():
        for index, bar in enumerate(lane_bars):
            limit = sessions[bar.session].end if bar.session < len(sessions) else bar.end + gap_s
            if index + 1 < len(lane_bars):
                limit = min(limit, lane_bars[index + 1].start)
            ended = _epoch((records.get(bar.key) or {}).get("work_ended_at"))
            if ended is None or not bar.start <= ended <= bar.end:
                ended = bar.end
            end = min(ended + gap_s, limit)
            if end > bar.end:
                out.append(
                    Bar(bar.key, bar.lane, bar.end, end, "cooldown", bar.attempt, bar.session)
                )
    return out


def _before_work(bars: list[Bar], records: Mapping[str, Mapping[str, Any]]) -> list[Bar]:
    """From each bar's start to its record's first measured work (`work_started_at`)."""
    out: list[Bar] = []
    for bar in bars:
        work = _epoch((records.get(bar.key) or {}).get("work_started_at"))
        if work is not None and bar.start < work <= bar.end:
            out.append(
                Bar(bar.key, bar.lane, bar.start, work, "before_work", bar.attempt, bar.session)
            )
    return out


def _lane_order(lane: str) -> tuple[Any, ...]:
    """Natural order: GPU 2 before GPU 10, nodes grouped, CPU lanes last."""
    node, _, gpu = lane.rpartition(":")
    return (lane.startswith("CPU "), node, int(gpu) if gpu.isdigit() else 0, gpu)


def build_timeline(results: StudyResults) -> Timeline:
    """Every attempt as a bar on each of its GPUs, with cooldowns and sessions."""
    records = {str(r.get("key")): r for r in results.records}
    builder = _Builder(records)
    sessions = _split_sessions(results.journal)
    for index, events in enumerate(sessions):
        for event in events:
            if event["event"] in TERMINAL_EVENTS:
                builder.last_session_of[str(event.get("key"))] = index
    for index, events in enumerate(sessions):
        builder.session(index, events)
    started = {bar.key for bar in builder.bars}
    for key, record in records.items():
        if key not in started:
            builder.from_record(key, record)
    bars, cpu_lanes = _cpu_lanes(builder.bars)
    gap = float(results.study.get("experiment_gap_s") or 0)
    if gap > 0:
        gpu_bars = [b for b in bars if b.lane not in cpu_lanes]
        bars += _cooldowns(gpu_bars, gap, builder.sessions, records)
    bars += _before_work([b for b in bars if b.kind == "succeeded"], records)
    lanes = sorted({b.lane for b in bars} | set(results.facts.get("gpus") or []), key=_lane_order)
    return Timeline(bars, builder.sessions, lanes, results.gpu_count, builder.retries, cpu_lanes)
