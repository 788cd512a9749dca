"""structlog set-up for the CLI, and secret redaction.

The library itself never configures structlog (it only gets loggers): the
application that imports it keeps its own set-up. The CLI's configuration
runs `redact_secrets` on every event; an application can add that processor
to its own chain. Container output is redacted before it is written anywhere.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["REDACTED", "configure_logging", "redact", "redact_secrets", "register_secret"]

REDACTED = "***"
_MIN_SECRET_LEN = 4
_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Add a value that must never appear in logs."""
    if len(value) >= _MIN_SECRET_LEN:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """Replace every registered secret in `text`."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v) for v in value)
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub registered secrets from every field."""
    if not _secrets:
        return event_dict
    return {k: _redact_value(v) for k, v in event_dict.items()}


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is now, not to the one at configure time.

    The live display (rich's Live) swaps `sys.stderr` for a proxy that prints
    above the bars; a logger holding the original file would write through the
    display, and the next refresh would paint over the line.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(*, json_logs: bool = False, level: int = logging.INFO) -> None:
    """Configure structlog for the CLI: console or JSON lines on stderr, secrets redacted."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_logs
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
