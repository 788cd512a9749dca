"""Runners without a daemon: the shared lifecycle on a fake backend, specs, the helper by path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from llem_dispatch import DockerRunner, ExperimentResult, LocalRunner
from llem_dispatch._exchange import ExchangeDir
from llem_dispatch._logcapture import LogCapture
from llem_dispatch.runners._backend import (
    NEUTRAL_ERRORS,
    ExitStatus,
    Pump,
    Run,
    helper_script,
)
from llem_dispatch.runners._lifecycle import run_lifecycle


class FakeBackend:
    """A RunBackend whose 'experiment' writes its result at start and exits 0 at once."""

    noun = "fake"
    log = structlog.get_logger("tests.fake")
    image_digest: str | None = None
    errors = NEUTRAL_ERRORS

    def __init__(self, *, cleanup_error: Exception | None = None) -> None:
        self.cleanup_error = cleanup_error
        self.calls: list[str] = []

    def exchange_root(self, exchange: ExchangeDir) -> str:
        return str(exchange.path)

    async def prepare(self) -> None:
        self.calls.append("prepare")

    async def start(self, run: Run) -> None:
        self.calls.append("start")
        (run.exchange.path / run.exchange.result_name).write_text('{"ok": 1}')

    def pumps(self, capture: LogCapture) -> Sequence[Pump]:
        return []

    async def wait(self, run: Run) -> None:
        self.calls.append("wait")

    async def kill(self, run: Run) -> None:
        self.calls.append("kill")

    async def exited(self, run: Run) -> ExitStatus:
        self.calls.append("exited")
        return ExitStatus(code=0)

    async def stop(self, run: Run) -> None:
        self.calls.append("stop")

    async def cleanup(self, run: Run) -> None:
        self.calls.append("cleanup")
        if self.cleanup_error is not None:
            raise self.cleanup_error


def _settings(exchange_base: Path) -> LocalRunner:
    # LocalRunner's public attributes are exactly the RunSettings the lifecycle reads.
    return LocalRunner(["true"], exchange_base=exchange_base)


def _warnings(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["event"], e.get("step", "")) for e in logs if e["log_level"] == "warning"]


async def test_lifecycle_runs_hooks_in_order_and_removes_exchange(tmp_path: Path) -> None:
    backend = FakeBackend()
    result = await run_lifecycle(_settings(tmp_path), backend, {"a": 1}, gpus=["3"], observer=None)
    assert isinstance(result, ExperimentResult)
    assert result.data == {"ok": 1}
    assert result.runner.gpu_ids == ["3"]
    assert backend.calls == ["prepare", "start", "wait", "exited", "cleanup"]
    assert list(tmp_path.iterdir()) == []


async def test_container_cleanup_error_keeps_the_result(tmp_path: Path) -> None:
    backend = FakeBackend(cleanup_error=TypeError("boom"))
    with capture_logs() as logs:
        result = await run_lifecycle(_settings(tmp_path), backend, {"a": 2}, gpus=(), observer=None)
    assert isinstance(result, ExperimentResult)
    assert _warnings(logs) == [("cleanup_failed", "fake")]
    assert list(tmp_path.iterdir()) == []


async def test_exchange_removal_error_keeps_the_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: ExchangeDir) -> None:
        raise TypeError("open() missing required argument 'flags'")

    monkeypatch.setattr(ExchangeDir, "remove", broken)
    with capture_logs() as logs:
        result = await run_lifecycle(
            _settings(tmp_path), FakeBackend(), {"a": 3}, gpus=(), observer=None
        )
    assert isinstance(result, ExperimentResult)
    assert _warnings(logs) == [("cleanup_failed", "exchange_dir")]


def _spec_user(runner: DockerRunner) -> str | None:
    exchange = ExchangeDir(Path("/tmp/llem-x"), "h")
    user = runner.container_spec(exchange, [], config_hash="h").get("User")
    assert user is None or isinstance(user, str)
    return user


def test_container_runs_as_non_root_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1001)
    assert _spec_user(DockerRunner("img")) == "1000:1001"
    assert _spec_user(DockerRunner("img", user="65534:65534")) == "65534:65534"


def test_container_user_of_root_caller_is_the_image_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert _spec_user(DockerRunner("img")) is None
    assert _spec_user(DockerRunner("img", user="65534")) == "65534"


def test_local_function_runs_the_helper_by_path() -> None:
    runner = LocalRunner(function="pkg.mod:run", python="/usr/bin/python3")
    assert runner.command == ["/usr/bin/python3", str(helper_script()), "pkg.mod:run"]
    assert helper_script().is_file()


def test_helper_by_path_imports_from_cwd_not_its_own_folder(tmp_path: Path) -> None:
    # `models` is also a module beside the helper: the cwd's must win, the
    # helper's folder must not be on sys.path, and the package is not imported.
    (tmp_path / "models.py").write_text(
        "import importlib.util, sys\n"
        "def run(config):\n"
        "    return {'echo': config, 'package': 'llem_dispatch' in sys.modules,\n"
        "            'helper_folder': importlib.util.find_spec('_logcapture') is not None}\n"
    )
    exchange = ExchangeDir.create("abcd", base_dir=tmp_path)
    exchange.write_config({"a": 1})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(helper_script()), "models:run"],
        env={**env, **exchange.env(str(exchange.path))},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((exchange.path / exchange.result_name).read_text())
    assert result == {"echo": {"a": 1}, "package": False, "helper_folder": False}
