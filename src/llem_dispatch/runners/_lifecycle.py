"""The run lifecycle both runners share, written once: `run_lifecycle` over a `RunBackend`.

Exchange dir, secrets, start, gate, supervision, outcome and clean-up, in that
order; a backend (container or process) only starts, waits, kills, stops and
removes its own thing (`_backend`). Supervision under the limits is in
`_supervise`, reading the outcome in `_outcome`, cancellation in `_cancel`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
from pydantic import BaseModel

from llem_dispatch._exchange import ExchangeDir
from llem_dispatch._logcapture import LogCapture
from llem_dispatch._logging import register_secret
from llem_dispatch.errors import LlemError
from llem_dispatch.models import (
    ExperimentFailure,
    RunnerMetadata,
    compute_config_hash,
    config_to_dict,
)
from llem_dispatch.runners._backend import Gate, Run, RunBackend, RunSettings
from llem_dispatch.runners._cancel import CANCEL_SLACK_S, FORCE_KILL
from llem_dispatch.runners._gate import NO_SHELL, NO_SHELL_FIX
from llem_dispatch.runners._outcome import collect_outcome
from llem_dispatch.runners._quiet import PhaseFollower
from llem_dispatch.runners._supervise import supervise
from llem_dispatch.runners.protocol import Outcome, RunInfo, RunObserver

__all__ = ["DEFAULT_SECRET_ENV", "collect_secrets", "run_lifecycle"]

DEFAULT_SECRET_ENV: tuple[str, ...] = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def collect_secrets(
    names: Sequence[str], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Secrets from the host environment, registered for redaction."""
    env = os.environ if environ is None else environ
    found = {name: env[name] for name in names if env.get(name)}
    for value in found.values():
        register_secret(value)
    return found


async def run_lifecycle(
    settings: RunSettings,
    backend: RunBackend,
    config: BaseModel | Mapping[str, Any],
    *,
    gpus: Sequence[str] | None,
    observer: RunObserver | None,
    gate: Gate | None = None,
) -> Outcome:
    """Run one experiment through `backend`; return its validated result or failure.

    With `gate` (prestart), the experiment is started held at its gate, and
    opened once `gate()` returns: its start, timeout and observer count from there.
    The exchange dir is removed after a success only; a clean-up error is a
    warning and never changes the outcome.
    """
    data = config_to_dict(config)
    config_hash = compute_config_hash(data)
    # The timeout covers the whole attempt, from the first API call on: an engine
    # stuck at `create` or `start` cannot hold an experiment past it.
    deadline = anyio.current_time() + (settings.timeout or math.inf)
    await backend.prepare()
    run = _open_run(settings, backend, config_hash, tuple(str(g) for g in gpus or ()))
    run.deadline = deadline
    follower = PhaseFollower(backend, run, observer, asks_quiet=settings.function is not None)
    run.exchange.grants_quiet = True  # the follower grants it, whatever the observer
    run.cpu = follower.cpu_placement(gated=gate is not None)
    if gate is not None:
        run.exchange.hold_at_gate()
    succeeded = False
    try:
        run.exchange.write_config(data)
        run.exchange.write_secrets(collect_secrets(settings.secret_env))
        if gate is None:
            # Its GPUs are its own from the start: a window opening at once is quiet first.
            await follower.handed()
        # Before the start call: a process may mark its work before that call returns.
        run.launched = time.time()
        if gate is not None:
            await follower.enter("starting")
        await _start(settings, backend, run)
        if gate is not None:
            # A `command:` run is held whole behind the shell gate: nothing of it runs
            # before the gate, so it waits (no pause, and no resume at its gate).
            await follower.enter("preparing" if settings.function is not None else "waiting")
            run.gate_opened = await _pass_gate(settings, backend, run, gate, follower)
        run.capture = LogCapture(run.exchange.log_path)
        error = await supervise(settings, backend, run, run.capture, observer, follower)
        if error is not None:
            raise error
        metadata = RunnerMetadata(
            runner_type=settings.runner_type,
            runner_image=settings.image,
            image_digest=run.info.image_digest,
            runner_source=settings.source,
            container_id=run.info.container_id,
            process_id=run.info.process_id,
            gpu_ids=list(run.info.gpu_ids),
            exit_code=run.info.exit_code,
        )
        outcome = collect_outcome(
            data,
            run.exchange,
            run.info,
            metadata,
            settings.result_model,
            run.context,
            run.bound,
            max_result_bytes=settings.max_result_bytes,
            location=backend.exchange_root(run.exchange),
            errors=backend.errors,
        )
        succeeded = not isinstance(outcome, ExperimentFailure)
        return outcome
    except BaseException as exc:
        await _on_failure(settings, backend, run, exc)
        raise
    finally:
        await _clean_up(backend, run, remove_exchange=succeeded)


async def _start(settings: RunSettings, backend: RunBackend, run: Run) -> None:
    """Bring it up, within what is left of the experiment's timeout."""
    try:
        with anyio.CancelScope(deadline=run.deadline) as scope:
            await backend.start(run)
    except LlemError as exc:
        if run.exchange.gated and NO_SHELL in str(exc):
            exc.fix_suggestion = NO_SHELL_FIX
        raise
    if scope.cancelled_caught:
        raise backend.errors.timeout(
            f"timed out after {settings.timeout}s before the {backend.noun} had started"
            f"{backend.errors.slow_start}",
            **run.context,
        )


async def _pass_gate(
    settings: RunSettings, backend: RunBackend, run: Run, gate: Gate, follower: PhaseFollower
) -> float | None:
    """Hold the started experiment until `gate()` returns, then open its gate; return when
    (None: it exited at its gate, which stayed shut).

    Meanwhile it does its CPU-side start-up. If it exits first (an import
    error), the gate stays shut and its exit is supervised as usual. The
    experiment's timeout counts from here. Errors leave the task group
    unwrapped, as the `LlemError` they are.
    """
    errors: list[LlemError] = []
    opened: float | None = None
    async with anyio.create_task_group() as watch:

        async def exited_early() -> None:
            try:
                await backend.wait(run)
                run.bound.info(f"{backend.noun}_exited_at_gate")
            except LlemError as exc:
                errors.append(exc)
            watch.cancel_scope.cancel()

        watch.start_soon(exited_early)
        watch.start_soon(follower.watch_ready)
        await gate()
        # Resumed, on its own cores, and (if its window opens now) its neighbours quiet.
        await follower.handed()
        opened = time.time()  # before the go file: nothing the experiment marks precedes it
        run.exchange.open_gate()
        watch.cancel_scope.cancel()
    if errors:
        raise errors[0]
    run.deadline = anyio.current_time() + (settings.timeout or math.inf)
    return opened


def _open_run(
    settings: RunSettings, backend: RunBackend, config_hash: str, gpu_ids: tuple[str, ...]
) -> Run:
    exchange = ExchangeDir.create(config_hash, base_dir=settings.exchange_base)
    info = RunInfo(
        config_hash=config_hash,
        gpu_ids=gpu_ids,
        exchange_dir=str(exchange.path),
        log_path=str(exchange.log_path),
        runner_type=settings.runner_type,
        image=settings.image,
        image_digest=backend.image_digest,
        # Visibility variables unless the backend asks its engine for devices.
        gpu_request="env" if gpu_ids else None,
    )
    context: dict[str, Any] = {
        "config_hash": config_hash,
        "exchange_dir": exchange.path,
        "log_path": exchange.log_path,
    }
    bound = backend.log.bind(config_hash=config_hash, gpus=list(gpu_ids))
    return Run(exchange=exchange, info=info, context=context, bound=bound)


async def _on_failure(
    settings: RunSettings, backend: RunBackend, run: Run, exc: BaseException
) -> None:
    cancelled = isinstance(exc, anyio.get_cancelled_exc_class() | KeyboardInterrupt)
    if isinstance(exc, LlemError) or cancelled:
        run.bound.warning(
            "run_failed", error=type(exc).__name__, exchange_dir=str(run.exchange.path)
        )
    if cancelled:
        grace = 0.0 if FORCE_KILL.is_set() else settings.stop_grace_s
        run.cleanup_deadline = anyio.current_time() + grace + CANCEL_SLACK_S
        with anyio.CancelScope(shield=True, deadline=run.cleanup_deadline):
            if run.paused:  # a frozen run would take no signal but SIGKILL
                await backend.resume(run)
            await backend.stop(run)


async def _clean_up(backend: RunBackend, run: Run, *, remove_exchange: bool) -> None:
    """Secrets, log file, the container/process, then (after a success) the exchange dir.

    Never raises an `Exception`: a clean-up failure is a warning and leaves the
    run's outcome (result or error) as it was.
    """
    _attempt(run, "secrets", run.exchange.remove_secrets)
    _attempt(run, "gate", run.exchange.close_gate)
    if run.capture is not None:
        _attempt(run, "log", run.capture.close)
    try:
        with anyio.CancelScope(shield=True, deadline=run.cleanup_deadline) as scope:
            if run.paused:
                await backend.resume(run)
            await backend.cleanup(run)
        if scope.cancelled_caught:
            run.bound.warning("cleanup_cut_short", step=backend.noun, reason="interrupted")
    except Exception as exc:  # noqa: BLE001 - a clean-up error must not replace the outcome
        run.bound.warning("cleanup_failed", step=backend.noun, error=repr(exc))
    if remove_exchange:
        _attempt(run, "exchange_dir", run.exchange.remove)


def _attempt(run: Run, step: str, action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - a clean-up error must not replace the outcome
        run.bound.warning("cleanup_failed", step=step, error=repr(exc))
