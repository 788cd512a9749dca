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

__all__ = [
    "REDACTED",
    "TRUNCATE_AT",
    "configure_logging",
    "longest_secret",
    "redact",
    "redact_secrets",
    "redact_stream",
    "register_secret",
    "truncate",
]

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


def longest_secret() -> int:
    """Length of the longest registered secret (0 when none)."""
    return max((len(s) for s in _secrets), default=0)


def redact_stream(held: str, chunk: str) -> tuple[str, str]:
    """Redact output that arrives in pieces: (what can be written now, what to hold back).

    A secret written in two pieces is caught: the last `longest - 1` characters
    are held back until the next piece shows whether they begin a secret. Pass
    the held text back with the next chunk, and `redact` what is held at the end.
    """
    text = held + chunk
    keep = longest_secret() - 1
    if keep <= 0:
        return redact(text), ""
    cut = max(0, len(text) - keep)
    for secret in list(_secrets):
        # A whole secret that straddles the cut moves the cut to its end.
        start = text.find(secret, max(0, cut - len(secret) + 1))
        while start != -1 and start < cut:
            cut = max(cut, start + len(secret))
            start = text.find(secret, start + 1)
    return redact(text[:cut]), text[cut:]


TRUNCATE_AT = 64 * 1024


def truncate(text: str, limit: int = TRUNCATE_AT) -> str:
    """`text` within `limit` characters: its head and tail, the cut marked in between."""
    if len(text) <= limit:
        return text
    half = limit // 2
    omitted = len(text) - 2 * half
    return f"{text[:half]}\n[... {omitted} characters truncated ...]\n{text[-half:]}"


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
