"""One run's phases before it measured, from the experiment's marks and the host's times.

Pure: `phase_times` turns the marks file's entries (`start`, `ready`, `go`, `work`,
`done`, wall-clock seconds) and two host instants into a `PhaseTimes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from llem_dispatch.runners.protocol import PhaseTimes

__all__ = ["phase_times"]


def phase_times(
    marks: Mapping[str, Mapping[str, Any]], *, launched: float, gate: float | None
) -> PhaseTimes:
    """Prepare, gate wait and gate-to-work seconds (None where a mark is missing).

    `launched`: when the host began starting the experiment; `gate`: when its gate opened
    (None: it was not held at one, so its GPUs were its own from `launched`).
    """

    def at(name: str) -> float | None:
        entry = marks.get(name)
        return float(entry["t"]) if entry is not None else None

    start, ready, work, done = at("start"), at("ready"), at("work"), at("done")
    prepare_s = ready - start if start is not None and ready is not None else None
    gate_wait_s = gate_late_s = None
    if gate is not None:
        gate_wait_s = max(0.0, gate - (ready if ready is not None else launched))
        gate_late_s = max(0.0, ready - gate) if ready is not None else None
    handed = gate if gate is not None else launched
    rss = (marks.get("ready") or {}).get("rss_bytes")
    return PhaseTimes(
        prepare_s=max(0.0, prepare_s) if prepare_s is not None else None,
        gate_wait_s=gate_wait_s,
        gate_to_work_s=work - handed if work is not None else None,
        work_started_at=datetime.fromtimestamp(work, UTC) if work is not None else None,
        ready_rss_bytes=int(rss) if isinstance(rss, int) and not isinstance(rss, bool) else None,
        work_ended_at=datetime.fromtimestamp(done, UTC) if done is not None else None,
        gate_late_s=gate_late_s,
    )
