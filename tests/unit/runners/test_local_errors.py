"""A local run's failures, through LocalRunner for real: neutral classes, no engine named.

The same failures on a container run keep the Docker classes: the shared
lifecycle raises each backend's own `ErrorClasses` (checked here on a backend
that needs no daemon).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from structlog.testing import capture_logs

from llem_dispatch import LocalRunner
from llem_dispatch._exchange import ExchangeDir
from llem_dispatch._logcapture import LogCapture
from llem_dispatch.dispatch import Dispatcher, ErrorInfo
from llem_dispatch.errors import (
    DockerContainerError,
    DockerError,
    DockerHangError,
    DockerOOMError,
    DockerTimeoutError,
    ExperimentExitError,
    ExperimentHangError,
    ExperimentOOMError,
    ExperimentStartError,
    ExperimentTimeoutError,
    LlemError,
    RunnerError,
)
from llem_dispatch.gpu import GpuPool
from llem_dispatch.runners._backend import NEUTRAL_ERRORS, ErrorClasses, ExitStatus, Pump, Run
from llem_dispatch.runners._lifecycle import run_lifecycle
from llem_dispatch.runners.docker import DOCKER_ERRORS

ENGINE_WORDS = ("docker", "daemon", "container")


def assert_neutral(error: LlemError, logs: list[dict[str, Any]] | None = None) -> None:
    """No engine named in the class, message, fix, record or log lines."""
    assert not isinstance(error, DockerError)
    record = ErrorInfo.from_exception(error).model_dump_json()
    texts = [type(error).__name__, error.message, error.fix_suggestion, str(error), record]
    texts += [json.dumps(logs or [], default=str)]
    for text in texts:
        for word in ENGINE_WORDS:
            assert word not in text.lower(), f"{word!r} in {text!r}"


async def failure(runner: LocalRunner, cls: type[LlemError]) -> tuple[Any, list[dict[str, Any]]]:
    with capture_logs() as logs, pytest.raises(cls) as info:
        await runner.run({"n": 1})
    return info.value, logs


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


async def test_a_timeout_is_the_neutral_timeout(tmp_path: Path) -> None:
    runner = LocalRunner(sh("sleep 60"), timeout=0.5, exchange_base=tmp_path)
    error, logs = await failure(runner, ExperimentTimeoutError)
    assert type(error) is ExperimentTimeoutError
    assert "timed out after 0.5s" in error.message
    assert error.exit_code is not None
    assert_neutral(error, logs)


async def test_silence_is_the_neutral_hang(tmp_path: Path) -> None:
    runner = LocalRunner(sh("sleep 60"), silence_timeout=0.3, exchange_base=tmp_path)
    error, logs = await failure(runner, ExperimentHangError)
    assert type(error) is ExperimentHangError
    assert_neutral(error, logs)


@pytest.mark.parametrize("make", ["missing", "not_executable"])
async def test_a_program_that_cannot_start_is_a_start_error(tmp_path: Path, make: str) -> None:
    program = tmp_path / "prog"
    if make == "not_executable":
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o600)
    runner = LocalRunner([str(program)], exchange_base=tmp_path / "x")
    (tmp_path / "x").mkdir()
    error, logs = await failure(runner, ExperimentStartError)
    assert type(error) is ExperimentStartError
    assert f"cannot start {str(program)!r}" in error.message
    assert "exists on this host" in error.fix_suggestion
    assert error.exchange_dir is not None
    assert error.log_path is None, "nothing ran, so there is no log to point at"
    assert_neutral(error, logs)


async def test_a_bad_exit_is_the_neutral_exit_error(tmp_path: Path) -> None:
    runner = LocalRunner(sh("echo oops >&2; exit 7"), exchange_base=tmp_path)
    error, logs = await failure(runner, ExperimentExitError)
    assert type(error) is ExperimentExitError
    assert (error.exit_code, error.stderr_snippet) == (7, "oops")
    assert error.message == "local run exited with code 7"
    assert_neutral(error, logs)


async def test_no_result_is_the_neutral_exit_error(tmp_path: Path) -> None:
    error, logs = await failure(LocalRunner(["true"], exchange_base=tmp_path), ExperimentExitError)
    assert "wrote no result" in error.message
    assert_neutral(error, logs)


async def test_a_sigkill_from_outside_is_the_neutral_oom(tmp_path: Path) -> None:
    runner = LocalRunner(sh("kill -9 $$"), exchange_base=tmp_path)
    error, logs = await failure(runner, ExperimentOOMError)
    assert type(error) is ExperimentOOMError
    assert_neutral(error, logs)


async def test_the_dispatcher_records_the_neutral_class(tmp_path: Path) -> None:
    runner = LocalRunner([sys.executable, "-c", "raise SystemExit(3)"], exchange_base=tmp_path)
    async with Dispatcher(runner, pool=GpuPool.virtual_devices(1)) as dispatcher:
        record = await dispatcher.run({"n": 2}, gpus=1)
    assert record.status == "error"
    assert record.error is not None
    assert record.error.type == "ExperimentExitError"
    assert record.attempts == 1, "a bad exit is not retried"
    assert "docker" not in record.model_dump_json().lower()


# -- the same lifecycle on a backend with the Docker classes ---------------------------


class ScriptedBackend:
    """A RunBackend whose experiment exits as told (code, OOM) or never, without a daemon."""

    noun = "thing"
    log = structlog.get_logger("tests.scripted")
    image_digest: str | None = None

    def __init__(
        self, errors: ErrorClasses, *, code: int = 0, oom: str | None = None, hang: bool = False
    ) -> None:
        self.errors = errors
        self.status = ExitStatus(code=code, oom=oom)
        self.hang = hang
        self.stalled_start = False
        self.killed = anyio.Event()

    def exchange_root(self, exchange: ExchangeDir) -> str:
        return str(exchange.path)

    async def prepare(self) -> None:
        pass

    async def start(self, run: Run) -> None:
        if self.stalled_start:
            await anyio.sleep_forever()

    def pumps(self, capture: LogCapture) -> Sequence[Pump]:
        return []

    async def wait(self, run: Run) -> None:
        if self.hang:
            await self.killed.wait()

    async def kill(self, run: Run) -> None:
        self.killed.set()

    async def exited(self, run: Run) -> ExitStatus:
        return self.status

    async def stop(self, run: Run) -> None:
        pass

    async def cleanup(self, run: Run) -> None:
        pass


def settings(tmp_path: Path, **kwargs: Any) -> LocalRunner:
    # LocalRunner's public attributes are exactly the RunSettings the lifecycle reads.
    return LocalRunner(["true"], exchange_base=tmp_path, **kwargs)


CASES = [
    # (backend kwargs, runner kwargs, neutral class, Docker class)
    ({"code": 3}, {}, ExperimentExitError, DockerContainerError),
    ({"code": 137, "oom": "killed"}, {}, ExperimentOOMError, DockerOOMError),
    ({"hang": True}, {"timeout": 0.2}, ExperimentTimeoutError, DockerTimeoutError),
    ({"hang": True}, {"silence_timeout": 0.2}, ExperimentHangError, DockerHangError),
]


@pytest.mark.parametrize(("backend_kw", "runner_kw", "neutral", "docker"), CASES)
async def test_each_backend_raises_its_own_classes(
    tmp_path: Path,
    backend_kw: dict[str, Any],
    runner_kw: dict[str, Any],
    neutral: type[RunnerError],
    docker: type[DockerError],
) -> None:
    for errors, expected in ((NEUTRAL_ERRORS, neutral), (DOCKER_ERRORS, docker)):
        backend = ScriptedBackend(errors, **backend_kw)
        with pytest.raises(RunnerError) as info:
            await run_lifecycle(
                settings(tmp_path, **runner_kw), backend, {"a": 1}, gpus=(), observer=None
            )
        assert type(info.value) is expected


async def test_a_stalled_start_blames_the_daemon_only_for_docker(tmp_path: Path) -> None:
    messages = {}
    for errors in (NEUTRAL_ERRORS, DOCKER_ERRORS):
        backend = ScriptedBackend(errors)
        backend.stalled_start = True
        with pytest.raises(ExperimentTimeoutError) as info:
            await run_lifecycle(
                settings(tmp_path, timeout=0.2), backend, {"a": 1}, gpus=(), observer=None
            )
        assert type(info.value) is errors.timeout
        messages[errors.timeout] = info.value.message
    assert messages[ExperimentTimeoutError] == "timed out after 0.2s before the thing had started"
    assert messages[DockerTimeoutError] == (
        "timed out after 0.2s before the thing had started (the Docker daemon is slow or stuck)"
    )
