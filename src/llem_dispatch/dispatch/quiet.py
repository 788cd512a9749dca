"""Quiet windows: what shares a host with a measured window, and pausing what prepares.

`QuietLedger` is the pure core: each run's phase on the host, which runs are
paused, and per measured window the neighbour-seconds of preparation, work and
pausing that overlapped it. `QuietHost` is its shell: it pauses preparing runs
while any window is open (policy `pause`) and resumes them when none is.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

import anyio

from llem_dispatch.runners.protocol import RunControl, RunPhase

__all__ = ["POLICIES", "Policy", "QuietHost", "QuietLedger", "WindowShare"]

#: What runs beside a measured window may do: `pause` (preparing runs are frozen
#: until no window is open) or `run` (nothing is paused; overlaps are recorded).
Policy: TypeAlias = Literal["pause", "run"]
POLICIES: tuple[Policy, ...] = ("pause", "run")
#: Phases that count as a neighbour's preparation (its host-side work outside a window).
_PREPARING: frozenset[RunPhase] = frozenset({"starting", "preparing", "loading"})
#: How long pausing or resuming one run may take before it is given up (seconds).
CONTROL_S = 15.0
#: How long a window opening waits for a neighbour's start to end (to pause it after).
STARTS_S = 30.0


@dataclass(slots=True)
class WindowShare:
    """What overlapped one run's measured window, in neighbour-seconds."""

    #: Other runs' preparation (prepare part, or loading after their gate), not paused.
    prepare_s: float = 0.0
    #: Other runs' measured windows.
    work_s: float = 0.0
    #: Runs held paused for it (shared by every window open at the time).
    paused_s: float = 0.0
    #: Whether its window opened at all.
    opened: bool = False

    @property
    def disturbed(self) -> bool:
        """Whether unpaused preparation overlapped its window."""
        return self.prepare_s > 0.0


@dataclass(slots=True)
class QuietLedger:
    """The phases of a host's runs, and what overlapped each window (pure: times given)."""

    phases: dict[Hashable, RunPhase] = field(default_factory=dict)
    paused: set[Hashable] = field(default_factory=set)
    shares: dict[Hashable, WindowShare] = field(default_factory=dict)
    _last: float | None = None

    def advance(self, now: float) -> None:
        """Account the time since the last change to every open window."""
        if self._last is not None and now > self._last:
            dt = now - self._last
            measuring = self.measuring()
            paused = len(self.paused)
            for key in measuring:
                share = self.shares[key]
                share.prepare_s += dt * sum(
                    1
                    for other, phase in self.phases.items()
                    if other != key and phase in _PREPARING and other not in self.paused
                )
                share.work_s += dt * (len(measuring) - 1)
                share.paused_s += dt * paused
        self._last = now if self._last is None else max(self._last, now)

    def set_phase(self, key: Hashable, phase: RunPhase, now: float) -> None:
        """`key` has entered `phase` at `now`."""
        self.advance(now)
        self.phases[key] = phase
        if phase == "measuring":
            self.shares.setdefault(key, WindowShare()).opened = True

    def set_paused(self, key: Hashable, paused: bool, now: float) -> None:
        """`key` is paused (or resumed) from `now`."""
        self.advance(now)
        if paused and key in self.phases:
            self.paused.add(key)
        else:
            self.paused.discard(key)

    def remove(self, key: Hashable, now: float) -> WindowShare | None:
        """`key` has ended at `now`: its window's share (None if it never measured)."""
        self.advance(now)
        self.phases.pop(key, None)
        self.paused.discard(key)
        return self.shares.pop(key, None)

    def starting(self) -> list[Hashable]:
        """The runs being started (they cannot be paused until they have)."""
        return [key for key, phase in self.phases.items() if phase == "starting"]

    def measuring(self) -> list[Hashable]:
        """The runs whose window is open."""
        return [key for key, phase in self.phases.items() if phase == "measuring"]

    def to_pause(self, *, opening: bool = False) -> list[Hashable]:
        """Under `pause`: the preparing runs to freeze now (a window is open, or `opening`)."""
        if not (opening or self.measuring()):
            return []
        return [k for k, p in self.phases.items() if p == "preparing" and k not in self.paused]

    def to_resume(self, policy: Policy) -> list[Hashable]:
        """The paused runs to thaw now: none is measuring, or they no longer prepare."""
        keep = policy == "pause" and bool(self.measuring())
        return [k for k in self.paused if not (keep and self.phases.get(k) == "preparing")]


class QuietHost:
    """One host's quiet windows: pauses what prepares while anything measures (`pause`).

    Every run on the host reports its phases (`on_phase`) with a `RunControl`,
    and `finish` when it ends, which returns what overlapped its window.
    """

    def __init__(self, policy: Policy = "pause", clock: Callable[[], float] | None = None) -> None:
        self.policy: Policy = policy
        self.ledger = QuietLedger()
        self._clock = clock or anyio.current_time
        self._controls: dict[Hashable, RunControl] = {}
        # Uncontended, taken without yielding: a gate opening waits for no other task.
        self._changed = anyio.Condition(anyio.Lock(fast_acquire=True))

    async def on_phase(self, key: Hashable, phase: RunPhase, control: RunControl) -> None:
        """`key` has entered `phase`: pause or resume runs as the policy says, then return.

        A run leaving `preparing` is resumed before it goes on; a window opening
        returns only once the runs preparing beside it are paused, after waiting
        (bounded) for any being started to have started.
        """
        with anyio.CancelScope(shield=True):
            async with self._changed:
                self._controls[key] = control
                if phase == "measuring" and self.policy == "pause":
                    with anyio.move_on_after(STARTS_S):
                        while self.ledger.starting():
                            await self._changed.wait()
                    # Quiet first: the window opens (and counts) once they are paused.
                    await self._pause(opening=True)
                self.ledger.set_phase(key, phase, self._clock())
                await self._settle()
                self._changed.notify_all()

    async def finish(self, key: Hashable) -> WindowShare | None:
        """`key` has ended: thawed if it was paused, forgotten; its window's share."""
        share = None
        with anyio.CancelScope(shield=True):
            async with self._changed:
                control = self._controls.pop(key, None)
                if key in self.ledger.paused and control is not None:
                    with anyio.move_on_after(CONTROL_S):
                        await control.resume()
                share = self.ledger.remove(key, self._clock())
                await self._settle()
                self._changed.notify_all()
        return share

    async def _settle(self) -> None:
        """Resume what no longer needs pausing, then pause what must be (each bounded)."""
        for key in self.ledger.to_resume(self.policy):
            with anyio.move_on_after(CONTROL_S):
                await self._controls[key].resume()
            self.ledger.set_paused(key, False, self._clock())
        await self._pause()

    async def _pause(self, *, opening: bool = False) -> None:
        if self.policy != "pause":
            return
        for key in self.ledger.to_pause(opening=opening):
            paused = False
            with anyio.move_on_after(CONTROL_S):
                paused = await self._controls[key].pause()
            self.ledger.set_paused(key, paused, self._clock())
