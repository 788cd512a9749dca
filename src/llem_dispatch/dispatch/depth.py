"""How far ahead to prestart: as deep as the measured preparations need, never shallower.

Pure: `PrepareDepth` starts at one run ahead per GPU. Each finished run tells it how
long its preparation took and how long one run holds its GPU (gate to `done`, plus
the cooldown): a run started N runs ahead has about N such spans to prepare in, so
the depth becomes the N that covers the longest preparation seen, with a margin.
Under `prepare_during_measurement: pause` a run that prepared unprestarted was never
frozen, so the measured windows (when neighbours are frozen) are taken out of its
span first. A prestarted run still preparing as its gate opens also makes it one
deeper. It goes up to `MAX_AUTO_DEPTH` and never back (the memory reserve, not
this, bounds what waits prepared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DEPTH_MARGIN", "MAX_AUTO_DEPTH", "PrepareDepth"]

#: The deepest `auto` goes: experiments per GPU prepared ahead of the running one.
MAX_AUTO_DEPTH = 4
#: Preparations vary run to run: plan for this much longer than the longest seen.
DEPTH_MARGIN = 1.25


@dataclass(slots=True)
class PrepareDepth:
    """The `auto` prestart depth, from each finished run's record."""

    depth: int = 1

    def late(self) -> int:
        """A prestarted run was still preparing as its gate opened: one deeper."""
        self.depth = min(self.depth + 1, MAX_AUTO_DEPTH)
        return self.depth

    def observe(
        self,
        *,
        prepare_s: float | None,
        held_s: float | None,
        cooldown_s: float,
        window_s: float = 0.0,
        frozen_in_windows: bool = False,
    ) -> int:
        """A run finished: deepen so that a preparation like its own would be ready.

        `prepare_s`: its start to its `ready` mark (a prestarted run's includes the time
        it was frozen); `held_s`: its gate (or `ready`) to its `done` mark;
        `window_s`: its measured window; `frozen_in_windows`: preparations are frozen
        while a window is open and this run's own preparation was not (it was not
        prestarted), so the span a run ahead really has is shorter by the window.
        """
        if prepare_s is None or held_s is None or prepare_s <= 0:
            return self.depth
        span = held_s + cooldown_s - (window_s if frozen_in_windows else 0.0)
        if span <= 0:
            return self.depth
        needed = math.ceil(prepare_s * DEPTH_MARGIN / span)
        self.depth = max(self.depth, min(needed, MAX_AUTO_DEPTH))
        return self.depth
