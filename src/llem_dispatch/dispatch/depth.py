"""How far ahead to prestart: deeper when a prestarted run's GPU had to wait for it.

Pure: `PrepareDepth` starts at one run ahead per GPU and goes one deeper each time a
prestarted run is still preparing when its gate opens (its preparation outlasted
the time it had), up to `MAX_AUTO_DEPTH`; it never goes back (the memory reserve,
not this, bounds what waits prepared).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_AUTO_DEPTH", "PrepareDepth"]

#: The deepest `auto` goes: experiments per GPU prepared ahead of the running one.
MAX_AUTO_DEPTH = 4


@dataclass(slots=True)
class PrepareDepth:
    """The `auto` prestart depth, from each finished run's record."""

    depth: int = 1

    def late(self) -> int:
        """A prestarted run was still preparing as its gate opened: one deeper."""
        self.depth = min(self.depth + 1, MAX_AUTO_DEPTH)
        return self.depth
