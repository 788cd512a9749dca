"""Cancellation of runs: the force-kill switch (a second Ctrl-C) and the slack it leaves.

A cancelled run is stopped gracefully within its stop grace period, unless the
switch is on; either way its stopping and removal end within the slack.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import anyio

__all__ = [
    "CANCEL_SLACK_S",
    "FORCE_KILL",
    "force_kill_requested",
    "set_force_kill",
    "wait_until_forced",
]

#: Set (e.g. by a second Ctrl-C) to skip the stop grace period when cancelling runs.
#: Change it through `set_force_kill`, which can be undone.
FORCE_KILL = threading.Event()

#: Once cancelled, seconds beyond the stop grace period for stopping and removing a
#: run: enough for a healthy engine, and a bound on an exit against a hung one.
CANCEL_SLACK_S = 4.0


def set_force_kill(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Skip (or stop skipping) the stop grace period of runs being cancelled.

    Takes effect at once; use the return value as a context manager to restore the
    previous setting on exit (tests), or ignore it (a second Ctrl-C).
    """
    previous = FORCE_KILL.is_set()
    _apply_force_kill(on)

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        try:
            yield
        finally:
            _apply_force_kill(previous)

    return restore()


def force_kill_requested() -> bool:
    """Whether cancelled runs skip their stop grace period now."""
    return FORCE_KILL.is_set()


def _apply_force_kill(on: bool) -> None:
    if on:
        FORCE_KILL.set()
    else:
        FORCE_KILL.clear()


async def wait_until_forced() -> None:
    """Return once FORCE_KILL is set (a second Ctrl-C)."""
    # FORCE_KILL is a threading.Event set from a signal handler: poll it.
    while not FORCE_KILL.is_set():  # noqa: ASYNC110
        await anyio.sleep(0.1)
