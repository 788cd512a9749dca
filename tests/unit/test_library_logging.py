"""A library leaves its host's logging alone: only the CLI configures structlog."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

APP = textwrap.dedent(
    """
    import json, sys
    import anyio, structlog

    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
    )
    before = structlog.get_config()

    import llem_dispatch
    from llem_dispatch import Dispatcher, GpuPool
    from llem_dispatch.testing import FakeRunner

    def boom(config, gpus):
        raise RuntimeError("not a llem error")  # logged by the dispatcher

    async def main():
        async with Dispatcher(FakeRunner(boom), pool=GpuPool.virtual_devices(1)) as d:
            record = await d.run({"x": 1}, gpus=1)
        assert record.status == "error"

    anyio.run(main)
    structlog.get_logger("app").info("app_event", n=1)
    print("SAME_CONFIG" if structlog.get_config() == before else "CHANGED", flush=True)
    """
)


def test_importing_and_using_the_library_keeps_the_apps_structlog_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", APP], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "SAME_CONFIG"
    events = [json.loads(line) for line in lines[:-1]]  # every log line is the app's JSON
    assert {"event": "app_event", "n": 1, "level": "info"} in events
    assert any(e["event"] == "unexpected_error" for e in events)


def test_cli_logging_follows_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the live display sys.stderr is rich's proxy: log lines must go through it,
    or the next refresh paints over them (and over the display's own lines)."""
    import io
    import logging

    import structlog

    from llem_dispatch import _logging

    saved = structlog.get_config()
    try:
        _logging.configure_logging(level=logging.WARNING)
        swapped = io.StringIO()
        monkeypatch.setattr(sys, "stderr", swapped)
        structlog.get_logger("t").warning("experiment_failed", key="k1")
        assert "experiment_failed" in swapped.getvalue()
        assert "k1" in swapped.getvalue()
    finally:
        structlog.configure(**saved)
