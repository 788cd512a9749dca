"""LocalRunner: the container protocol as a host subprocess, for machines without Docker.

Same exchange dir, env, result/error files, timeout, silence limit and cancellation
as DockerRunner (one shared lifecycle); its errors are the runner-neutral classes
(`ExperimentTimeoutError`, ...), which the Docker classes subclass. The process runs
in its own process group so a kill reaches every child, as stopping a container would.
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
from typing import Any, ClassVar, Self

import anyio
import anyio.abc
import anyio.to_thread
import structlog
from pydantic import BaseModel

from llem_dispatch._exchange import DEFAULT_MAX_RESULT_BYTES, ExchangeDir
from llem_dispatch._logcapture import LogCapture
from llem_dispatch.errors import ConfigError, ExperimentStartError
from llem_dispatch.runners._backend import (
    KILL_WAIT_S,
    NEUTRAL_ERRORS,
    ExitStatus,
    Gate,
    Pump,
    Run,
    check_run_options,
    helper_script,
)
from llem_dispatch.runners._cancel import FORCE_KILL, wait_until_forced
from llem_dispatch.runners._gate import gated_argv
from llem_dispatch.runners._hostproc import place_group, place_process
from llem_dispatch.runners._lifecycle import DEFAULT_SECRET_ENV, run_lifecycle
from llem_dispatch.runners._quiet import thread_env
from llem_dispatch.runners.kinds import RunnerKind, RunnerOptions
from llem_dispatch.runners.protocol import CpuPlacement, Outcome, RunObserver

__all__ = ["LocalRunner", "LocalRunnerKind"]

CHUNK = 64 * 1024

log = structlog.get_logger("llem_dispatch.local")


class LocalRunner:
    """Runs each experiment as a subprocess on the host under the container protocol.

    Args:
        command: argv to run (it finds its paths in the LLEM_* environment).
        function: `module:function` run through the stdlib helper with this
            Python (by file path: the package is not imported); exclusive with `command`.
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
            list(command) if command is not None else [python, str(helper_script()), str(function)]
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

    def describe_launch(
        self, exchange: ExchangeDir, gpu_ids: Sequence[str], *, config_hash: str
    ) -> tuple[str, dict[str, Any]]:
        """For --dry-run: the process it would start for one experiment (argv, cwd, env)."""
        env = self.process_env(exchange, gpu_ids)
        return "process of the first experiment:", {
            "argv": self.command,
            "cwd": str(self.cwd),
            "env": {k: v for k, v in env.items() if k.startswith(("LLEM_", "CUDA_"))},
        }

    @property
    def speaks_gate(self) -> bool:
        """Runs can be held at a gate: the helper waits (`function:`), or a shell gate
        `exec`s the `command:` once the gate opens."""
        return True

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Sequence[str] | None = None,
        observer: RunObserver | None = None,
        gate: Gate | None = None,
    ) -> Outcome:
        """Run one experiment as a subprocess; same outcomes and gate as DockerRunner.

        Raises the runner-neutral classes: `ExperimentStartError` (the program could
        not start), `ExperimentTimeoutError` / `ExperimentHangError`,
        `ExperimentOOMError`, `ExperimentExitError` (bad exit or no result).
        """
        return await run_lifecycle(
            self, _ProcessRun(self), config, gpus=gpus, observer=observer, gate=gate
        )


class _ProcessRun:
    """One run's process group: the `RunBackend` that `run_lifecycle` drives for LocalRunner.

    The process leads its own group, so a kill reaches every child, as stopping
    a container would.
    """

    noun = "process"
    log = log
    image_digest: str | None = None
    # Runner-neutral: no engine is involved, so no engine's name or fix in them.
    errors = NEUTRAL_ERRORS

    def __init__(self, runner: LocalRunner) -> None:
        self.runner = runner
        self.process: anyio.abc.Process | None = None

    def exchange_root(self, exchange: ExchangeDir) -> str:
        return str(exchange.path)

    async def prepare(self) -> None:
        """Nothing to check before the exchange dir: a missing program fails at start."""

    async def start(self, run: Run) -> None:
        runner = self.runner
        env = runner.process_env(run.exchange, run.info.gpu_ids)
        env.update(thread_env(run.cpu, env))
        command = runner.command
        if run.exchange.gated and runner.function is None:
            command = gated_argv(command)
        try:
            self.process = await anyio.open_process(
                command, env=env, cwd=runner.cwd, start_new_session=True, stdin=None
            )
        except OSError as exc:
            raise ExperimentStartError(
                f"cannot start {runner.command[0]!r}: {exc.strerror}",
                fix_suggestion="Check the study's command / function and that the "
                "program exists on this host and may be run by this user.",
                # Nothing ran, so no log was written: point at none.
                **{k: v for k, v in run.context.items() if k != "log_path"},
            ) from exc
        run.info.process_id = self.process.pid
        run.bind(pid=self.process.pid)
        if run.cpu is not None:
            # At once, while it is one thread that has started nothing: all it starts
            # later inherits the cores and priority.
            place_process(self.process.pid, run.cpu)

    async def pause(self, run: Run) -> bool:
        """SIGSTOP its process group."""
        if self.process is None or self.process.returncode is not None:
            return False
        try:
            os.killpg(self.process.pid, signal.SIGSTOP)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    async def resume(self, run: Run) -> None:
        """SIGCONT its process group."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGCONT)

    async def place(self, run: Run, placement: CpuPlacement) -> None:
        """Every thread of its process group onto these cores, at this priority."""
        if self.process is not None and self.process.returncode is None:
            pid = self.process.pid
            moved = await anyio.to_thread.run_sync(place_group, pid, placement)
            run.bound.debug("process_placed", cpus=list(placement.cpus), threads=moved)

    def _running(self) -> anyio.abc.Process:
        assert self.process is not None
        return self.process

    def pumps(self, capture: LogCapture) -> Sequence[Pump]:
        process = self._running()
        assert process.stdout is not None
        assert process.stderr is not None
        stdout, stderr = process.stdout, process.stderr
        return [lambda: _pump(stdout, capture, "stdout"), lambda: _pump(stderr, capture, "stderr")]

    async def wait(self, run: Run) -> None:
        await self._running().wait()

    async def kill(self, run: Run) -> None:
        _kill_group(self._running())

    async def exited(self, run: Run) -> ExitStatus:
        process = self._running()
        # Orphaned children may hold the pipes open: end them so the readers stop.
        _kill_group(process)
        code = process.returncode
        assert code is not None
        oom = None
        if code == -signal.SIGKILL:
            oom = "process was killed with SIGKILL, not by us (the kernel OOM killer?)"
        return ExitStatus(code=128 - code if code < 0 else code, oom=oom)

    async def stop(self, run: Run) -> None:
        """SIGTERM the group, then wait out the grace period (the clean-up SIGKILLs)."""
        grace = self.runner.stop_grace_s
        if self.process is None or FORCE_KILL.is_set() or grace <= 0:
            return
        run.bound.info("process_stopping", grace_s=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with anyio.move_on_after(grace):
            async with anyio.create_task_group() as tg:

                async def forced() -> None:
                    # A second Ctrl-C mid-grace: stop waiting (the clean-up SIGKILLs).
                    await wait_until_forced()
                    tg.cancel_scope.cancel()

                tg.start_soon(forced)
                await self.process.wait()
                tg.cancel_scope.cancel()

    async def cleanup(self, run: Run) -> None:
        """Like a stopped container: nothing of the experiment outlives it."""
        if self.process is None:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(KILL_WAIT_S):
            _kill_group(self.process)
            await self.process.aclose()


async def _pump(stream: anyio.abc.ByteReceiveStream, capture: LogCapture, name: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with contextlib.suppress(
        anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError
    ):
        while True:
            chunk = await stream.receive(CHUNK)
            capture.feed(name, decoder.decode(chunk))


def _kill_group(process: anyio.abc.Process) -> None:
    """SIGKILL the whole process group; it is gone or ours, never anyone else's."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class LocalRunnerKind(RunnerKind):
    """The `local` runner kind: each experiment a host subprocess (no image, no engine).

    GPUs are handed over by visibility variables only. A kind that runs host
    processes differently subclasses this and sets `runner_class`.
    """

    gpu_request = "env"
    summary = "the local subprocess runner (experiments run on this host, not in containers)"
    #: The runner this kind builds (a `LocalRunner` subclass keeps the whole lifecycle).
    runner_class: ClassVar[type[LocalRunner]] = LocalRunner

    def build(self, options: RunnerOptions, image: str | None = None) -> LocalRunner:
        """A `runner_class` running the study's `command:` or `function:` in its folder."""
        if options.command is None and options.function is None:
            raise ConfigError(
                f"the {self.name} runner needs `command:` or `function:` in the study",
                fix_suggestion="Add `function: module:function` to the study.",
            )
        return self.runner_class(
            options.command,
            function=options.function,
            timeout=options.timeout_s,
            source=options.source,
            env=options.env,
            cwd=options.cwd,
            silence_timeout=options.silence_timeout_s,
            exchange_base=options.exchange_base,
            stop_grace_s=options.stop_grace_s,
        )
