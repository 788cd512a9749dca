"""A started run, from start to exit under its limits: timeout, silence watchdog, output.

Followers copy the backend's output into the log capture while the exit is
awaited under the timeout and silence limit; a run at a limit is killed, and
how it ended becomes the backend's error class for it (timeout, hang, OOM).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeAlias

import anyio
import anyio.abc

from llem_dispatch._logcapture import LogCapture, watch_silence
from llem_dispatch.errors import LlemError
from llem_dispatch.runners._backend import (
    KILL_WAIT_S,
    LOG_DRAIN_S,
    ErrorClasses,
    ExitStatus,
    Pump,
    Run,
    RunBackend,
    RunSettings,
)
from llem_dispatch.runners._phases import phase_times
from llem_dispatch.runners._quiet import PhaseFollower
from llem_dispatch.runners.protocol import RunObserver, utcnow

__all__ = ["KilledFor", "killed_error", "supervise", "wait_bounded"]

KilledFor: TypeAlias = Literal["timeout", "hang"]


async def wait_bounded(
    wait: Callable[[], Awaitable[object]],
    capture: LogCapture,
    *,
    timeout_s: float | None,
    silence_s: float | None,
) -> KilledFor | None:
    """Await the experiment's exit under its timeout and silence limit.

    Returns None when it exited by itself, else which limit fired (the caller
    then kills it). An error raised by `wait` propagates.
    """
    hang = anyio.Event()
    error: LlemError | None = None
    with anyio.CancelScope() as scope:
        if timeout_s is not None:
            scope.deadline = anyio.current_time() + timeout_s
        async with anyio.create_task_group() as watch:
            if silence_s is not None:
                watch.start_soon(watch_silence, capture, silence_s, scope, hang)
            try:
                await wait()
            except LlemError as exc:
                # Raised out of the task group it would arrive wrapped in an
                # ExceptionGroup, which no caller (nor the retry policy) expects.
                error = exc
            watch.cancel_scope.cancel()
    if error is not None:
        raise error
    if not scope.cancelled_caught:
        return None
    return "hang" if hang.is_set() else "timeout"


def killed_error(
    killed_for: KilledFor | None,
    *,
    timeout: float | None,
    silence_timeout: float | None,
    context: dict[str, Any],
    errors: ErrorClasses,
) -> LlemError | None:
    """The error for a run we killed at one of its limits (None if we did not)."""
    if killed_for == "hang":
        return errors.hang(f"no output for {silence_timeout}s: killed as hung", **context)
    if killed_for == "timeout":
        return errors.timeout(f"timed out after {timeout}s and was killed", **context)
    return None


async def supervise(
    settings: RunSettings,
    backend: RunBackend,
    run: Run,
    capture: LogCapture,
    observer: RunObserver | None,
    follower: PhaseFollower | None = None,
) -> LlemError | None:
    """From start to exit under the limits; the error for how it ended, if any.

    `follower` follows its phases meanwhile (grants its quiet window, sees `done`).
    """
    info = run.info
    info.started_at = utcnow()
    capture.touch()
    run.bound.info(f"{backend.noun}_started")
    if observer is not None:
        observer.on_started(info)
    errors: list[LlemError] = []
    async with anyio.create_task_group() as followers:
        drained = [_follow(followers, pump) for pump in backend.pumps(capture)]
        if follower is not None:
            followers.start_soon(follower.follow)
        try:
            killed_for, status = await _until_exit(settings, backend, run, capture, observer)
        except LlemError as exc:
            # Kept out of the task group: it would arrive wrapped in an ExceptionGroup.
            errors.append(exc)
        else:
            with anyio.move_on_after(LOG_DRAIN_S):
                for done in drained:
                    await done.wait()
        followers.cancel_scope.cancel()
    if errors:
        raise errors[0]
    return _exit_error(settings, backend, run, capture, status, killed_for)


async def _until_exit(
    settings: RunSettings,
    backend: RunBackend,
    run: Run,
    capture: LogCapture,
    observer: RunObserver | None,
) -> tuple[KilledFor | None, ExitStatus]:
    """Wait under the limits (kill at one), tell the observer, read how it ended."""
    killed_for = await wait_bounded(
        lambda: backend.wait(run),
        capture,
        timeout_s=None if math.isinf(run.deadline) else run.deadline - anyio.current_time(),
        silence_s=settings.silence_timeout,
    )
    if killed_for is not None:
        run.bound.warning(f"{backend.noun}_killed", reason=killed_for)
        await _kill_and_wait(backend, run)
    run.info.exited_at = utcnow()
    # Before `on_exited`: its `done` mark says where the GPUs' cooldown counts from.
    marks = run.exchange.read_marks()
    run.info.phases = phase_times(marks, launched=run.launched, gate=run.gate_opened)
    if observer is not None:
        observer.on_exited(run.info)
    return killed_for, await backend.exited(run)


def _follow(followers: anyio.abc.TaskGroup, pump: Pump) -> anyio.Event:
    """Start `pump` in `followers`; the event is set once it has returned."""
    done = anyio.Event()

    async def follow() -> None:
        try:
            await pump()
        finally:
            done.set()

    followers.start_soon(follow)
    return done


async def _kill_and_wait(backend: RunBackend, run: Run) -> None:
    if run.paused:  # an engine refuses to kill a paused container
        await backend.resume(run)
    await backend.kill(run)
    try:
        with anyio.fail_after(KILL_WAIT_S):
            await backend.wait(run)
    except TimeoutError as exc:
        raise backend.errors.other(
            f"{backend.noun} did not exit within {KILL_WAIT_S}s of SIGKILL", **run.context
        ) from exc


def _exit_error(
    settings: RunSettings,
    backend: RunBackend,
    run: Run,
    capture: LogCapture,
    status: ExitStatus,
    killed_for: KilledFor | None,
) -> LlemError | None:
    """Record the exit; a kill at a limit, then the OOM killer, are errors."""
    run.info.exit_code = status.code
    run.context["exit_code"] = status.code
    run.context["stderr_snippet"] = capture.tail("stderr") or capture.tail("stdout")
    run.bound.info(f"{backend.noun}_exited", exit_code=status.code, **status.log_fields)
    killed = killed_error(
        killed_for,
        timeout=settings.timeout,
        silence_timeout=settings.silence_timeout,
        context=run.context,
        errors=backend.errors,
    )
    if killed is not None:
        return killed
    if status.oom is not None:
        return backend.errors.oom(status.oom, **run.context)
    return None
