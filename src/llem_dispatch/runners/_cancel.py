"""Cancellation of runs: the force-kill switch (a second Ctrl-C) and the slack it leaves.

A cancelled run is stopped gracefully within its stop grace period, unless its
study's `ForceKill` is set; either way its stopping and removal end within the
slack. A study owns its switch (`run_study` makes it current for everything it
runs, and hands it to its placement), so setting it acts on that study alone and
on every placement; outside any study, the process-wide one is current.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import anyio

__all__ = [
    "CANCEL_SLACK_S",
    "FORCE_KILL",
    "ForceKill",
    "current_force_kill",
    "force_kill_requested",
    "set_force_kill",
    "wait_until_forced",
]

#: Once cancelled, seconds beyond the stop grace period for stopping and removing a
#: run: enough for a healthy engine, and a bound on an exit against a hung one.
CANCEL_SLACK_S = 4.0


class ForceKill:
    """A study's force-kill switch: once set, runs being cancelled skip their stop
    grace period, and placements end their attempts at once (Slurm kills its jobs).

    Set it from the event loop (the CLI's signal receiver does); waiters wake at
    once, nothing polls.
    """

    def __init__(self) -> None:
        self._on = False
        self._waiters: list[anyio.Event] = []

    def set(self) -> None:
        """Force: wake everything waiting for it (idempotent)."""
        self._on = True
        for event in self._waiters:
            event.set()

    def clear(self) -> None:
        """Back to graceful stops (tests)."""
        self._on = False

    def is_set(self) -> bool:
        """Whether cancelled runs skip their stop grace period now."""
        return self._on

    async def wait(self) -> None:
        """Return once the switch is set."""
        if self._on:
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        finally:
            self._waiters.remove(event)

    @contextlib.contextmanager
    def current(self) -> Iterator[ForceKill]:
        """Make this the switch of everything run in this context (a study's runs)."""
        token = _current.set(self)
        try:
            yield self
        finally:
            _current.reset(token)


#: The switch outside any study (a library's own `runner.run` calls).
_PROCESS_WIDE = ForceKill()
_current: contextvars.ContextVar[ForceKill] = contextvars.ContextVar(
    "llem_force_kill", default=_PROCESS_WIDE
)


def current_force_kill() -> ForceKill:
    """The switch of the study running in this context (else the process-wide one)."""
    return _current.get()


class _CurrentForceKill:
    """`FORCE_KILL`: whichever switch is current where it is read."""

    def is_set(self) -> bool:
        return current_force_kill().is_set()

    def set(self) -> None:
        current_force_kill().set()

    def clear(self) -> None:
        current_force_kill().clear()

    async def wait(self) -> None:
        await current_force_kill().wait()


#: The current study's switch (see `current_force_kill`), read where runs are cancelled.
FORCE_KILL = _CurrentForceKill()


def set_force_kill(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Set (or clear) the current switch; the return value, used as a context manager,
    restores the previous setting on exit (tests), or may be ignored."""
    switch = current_force_kill()
    previous = switch.is_set()
    _apply(switch, on)

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        try:
            yield
        finally:
            _apply(switch, previous)

    return restore()


def _apply(switch: ForceKill, on: bool) -> None:
    if on:
        switch.set()
    else:
        switch.clear()


def force_kill_requested() -> bool:
    """Whether cancelled runs skip their stop grace period now (the current switch)."""
    return current_force_kill().is_set()


async def wait_until_forced() -> None:
    """Return once the current switch is set (a second Ctrl-C)."""
    await current_force_kill().wait()
