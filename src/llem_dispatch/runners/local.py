"""LocalRunner: the container protocol as a host subprocess, for machines without Docker.

Same exchange dir, env, result/error files, timeout, silence limit, cancellation
and error classes as DockerRunner; the process runs in its own process group so
a kill reaches every child, as stopping a container would.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc
import structlog
from pydantic import BaseModel

from llem_dispatch._exchange import DEFAULT_MAX_RESULT_BYTES, ExchangeDir
from llem_dispatch._logcapture import LogCapture
from llem_dispatch.errors import (
    ConfigError,
    DockerOOMError,
    LlemError,
)
from llem_dispatch.models import (
    ExperimentFailure,
    RunnerMetadata,
    compute_config_hash,
    config_to_dict,
)
from llem_dispatch.runners._lifecycle import (
    DEFAULT_SECRET_ENV,
    FORCE_KILL,
    check_run_options,
    collect_outcome,
    collect_secrets,
    killed_error,
    wait_bounded,
    wait_until_forced,
)
from llem_dispatch.runners.protocol import Outcome, RunInfo, RunObserver, utcnow

__all__ = ["LocalRunner"]

KILL_WAIT_S = 15.0
CHUNK = 64 * 1024

log = structlog.get_logger("llem_dispatch.local")


class LocalRunner:
    """Runs each experiment as a subprocess on the host under the container protocol.

    Args:
        command: argv to run (it finds its paths in the LLEM_* environment).
        function: `module:function` run through the stdlib helper with this
            Python; exclusive with `command`.
        cwd: working directory (the experiment's module must be importable from it).
        Other arguments as for `DockerRunner`.
    """

    runner_type = "local"

    def __init__(
        self,
        command: Sequence[str] | None = None,
        *,
        function: str | None = None,
        timeout: float | None = None,
        source: str = "explicit",
        result_model: type[BaseModel] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        python: str = sys.executable,
        secret_env: Sequence[str] = DEFAULT_SECRET_ENV,
        silence_timeout: float | None = None,
        exchange_base: str | Path | None = None,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        stop_grace_s: float = 10.0,
    ) -> None:
        if (command is None) == (function is None):
            raise ValueError("give exactly one of command= or function=")
        check_run_options(timeout=timeout, silence_timeout=silence_timeout, function=function)
        self.command = (
            list(command)
            if command is not None
            else [python, "-m", "llem_dispatch.container", str(function)]
        )
        self.function = function
        self.timeout = timeout
        self.source = source
        self.result_model = result_model
        self.env = dict(env or {})
        self.cwd = Path(cwd) if cwd is not None else None
        self.secret_env = tuple(secret_env)
        self.silence_timeout = silence_timeout
        self.exchange_base = exchange_base
        self.max_result_bytes = max_result_bytes
        self.image: str | None = None
        self.stop_grace_s = stop_grace_s

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to release; present for the Runner protocol."""

    def process_env(self, exchange: ExchangeDir, gpu_ids: Sequence[str]) -> dict[str, str]:
        """The child's environment: host env minus secrets, plus the protocol's."""
        env = {k: v for k, v in os.environ.items() if k not in self.secret_env}
        env.update(self.env)
        env.update(exchange.env(str(exchange.path)))
        env["LLEM_GPU_IDS"] = ",".join(gpu_ids)
        # No runtime renumbers devices on the host: CUDA sees exactly these ids.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Sequence[str] | None = None,
        observer: RunObserver | None = None,
    ) -> Outcome:
        """Run one experiment as a subprocess; same outcomes and errors as DockerRunner."""
        data = config_to_dict(config)
        config_hash = compute_config_hash(data)
        gpu_ids = tuple(str(g) for g in gpus or ())
        exchange = ExchangeDir.create(config_hash, base_dir=self.exchange_base)
        info = RunInfo(
            config_hash=config_hash,
            gpu_ids=gpu_ids,
            exchange_dir=str(exchange.path),
            log_path=str(exchange.log_path),
            runner_type=self.runner_type,
        )
        bound = log.bind(config_hash=config_hash, gpus=list(gpu_ids))
        context: dict[str, Any] = {
            "config_hash": config_hash,
            "exchange_dir": exchange.path,
            "log_path": exchange.log_path,
        }
        capture = LogCapture(exchange.log_path)
        succeeded = False
        try:
            exchange.write_config(data)
            exchange.write_secrets(collect_secrets(self.secret_env))
            env = self.process_env(exchange, gpu_ids)
            try:
                process = await anyio.open_process(
                    self.command,
                    env=env,
                    cwd=self.cwd,
                    start_new_session=True,
                    stdin=None,
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot start {self.command[0]!r}: {exc.strerror}",
                    fix_suggestion="Check the study's command / function and that the "
                    "program exists on this host.",
                    **{k: v for k, v in context.items() if k != "log_path"},
                ) from exc
            info.process_id = process.pid
            bound = bound.bind(pid=process.pid)
            try:
                outcome = await self._supervise(process, capture, info, observer, context, bound)
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await self._terminate(process, bound)
                raise
            finally:
                # Like a stopped container: nothing of the experiment outlives it.
                with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_WAIT_S):
                    await _kill_group(process)
                    await process.aclose()
            if isinstance(outcome, LlemError):
                raise outcome
            metadata = RunnerMetadata(
                runner_type=self.runner_type,
                runner_source=self.source,
                process_id=info.process_id,
                gpu_ids=list(gpu_ids),
                exit_code=info.exit_code,
            )
            result = collect_outcome(
                data,
                exchange,
                info,
                metadata,
                self.result_model,
                context,
                bound,
                max_result_bytes=self.max_result_bytes,
                location=str(exchange.path),
            )
            succeeded = not isinstance(result, ExperimentFailure)
            return result
        except BaseException as exc:
            if isinstance(exc, LlemError | anyio.get_cancelled_exc_class()):
                bound.warning(
                    "run_failed", error=type(exc).__name__, exchange_dir=str(exchange.path)
                )
            raise
        finally:
            exchange.remove_secrets()
            capture.close()
            if succeeded:
                exchange.remove()

    async def _terminate(self, process: anyio.abc.Process, bound: Any) -> None:
        """On cancellation: SIGTERM the group, SIGKILL after the grace period (or if forced)."""
        if FORCE_KILL.is_set() or self.stop_grace_s <= 0:
            return
        bound.info("process_stopping", grace_s=self.stop_grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with anyio.move_on_after(self.stop_grace_s):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_until_forced)
                await process.wait()
                tg.cancel_scope.cancel()

    async def _supervise(
        self,
        process: anyio.abc.Process,
        capture: LogCapture,
        info: RunInfo,
        observer: RunObserver | None,
        context: dict[str, Any],
        bound: Any,
    ) -> int | LlemError:
        info.started_at = utcnow()
        capture.touch()
        bound.info("process_started")
        if observer is not None:
            observer.on_started(info)
        async with anyio.create_task_group() as readers:
            assert process.stdout is not None
            assert process.stderr is not None
            readers.start_soon(_pump, process.stdout, capture, "stdout")
            readers.start_soon(_pump, process.stderr, capture, "stderr")
            killed_for = await wait_bounded(
                process.wait,
                capture,
                timeout_s=self.timeout,
                silence_s=self.silence_timeout,
            )
            if killed_for is not None:
                bound.warning("process_killed", reason=killed_for)
                await _kill_group(process)
                with anyio.fail_after(KILL_WAIT_S):
                    await process.wait()
            info.exited_at = utcnow()
            if observer is not None:
                observer.on_exited(info)
            # Orphaned children may hold the pipes open: end them so the readers stop.
            await _kill_group(process)
        code = process.returncode
        assert code is not None
        info.exit_code = 128 - code if code < 0 else code
        context["exit_code"] = info.exit_code
        context["stderr_snippet"] = capture.tail("stderr") or capture.tail("stdout")
        bound.info("process_exited", exit_code=info.exit_code)
        killed = killed_error(
            killed_for,
            timeout=self.timeout,
            silence_timeout=self.silence_timeout,
            context=context,
        )
        if killed is not None:
            return killed
        if code == -signal.SIGKILL:
            return DockerOOMError(
                "process was killed with SIGKILL, not by us (the kernel OOM killer?)", **context
            )
        return info.exit_code


async def _pump(stream: anyio.abc.ByteReceiveStream, capture: LogCapture, name: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with contextlib.suppress(
        anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError
    ):
        while True:
            chunk = await stream.receive(CHUNK)
            capture.feed(name, decoder.decode(chunk))


async def _kill_group(process: anyio.abc.Process) -> None:
    """SIGKILL the whole process group; it is gone or ours, never anyone else's."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
