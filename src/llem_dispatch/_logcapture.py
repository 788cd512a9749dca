"""Bounded capture of an experiment's output: streamed to a file, tail kept in memory.

A container may print gigabytes; memory use stays constant because every chunk
goes straight to the log file and only the last lines are kept.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import IO

import anyio

from llem_dispatch._logging import redact
from llem_dispatch.errors import STDERR_TAIL_LINES

__all__ = ["LogCapture", "watch_silence"]

_MAX_LINE_CHARS = 4096


class LogCapture:
    """Writes stdout/stderr chunks to one log file; keeps the last lines of each stream."""

    def __init__(self, path: Path, *, tail_lines: int = STDERR_TAIL_LINES) -> None:
        self.path = path
        self._file: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._tails: dict[str, collections.deque[str]] = {
            "stdout": collections.deque(maxlen=tail_lines),
            "stderr": collections.deque(maxlen=tail_lines),
        }
        self._partial: dict[str, str] = {"stdout": "", "stderr": ""}
        self.last_output = time.monotonic()
        self.bytes_seen = 0

    def feed(self, stream: str, chunk: str) -> None:
        """Record one chunk of output from `stream` ('stdout' or 'stderr')."""
        self.last_output = time.monotonic()
        self.bytes_seen += len(chunk)
        text = self._partial[stream] + chunk
        lines = text.split("\n")
        self._partial[stream] = lines.pop()[-_MAX_LINE_CHARS:]
        tail = self._tails[stream]
        for line in lines[-(tail.maxlen or 1) :]:
            tail.append(redact(line[-_MAX_LINE_CHARS:]))
        if self._file is not None:
            self._file.write(redact(chunk))
            # Flushed per chunk: if the dispatcher is killed, the log on disk is complete.
            self._file.flush()

    def touch(self) -> None:
        """Count as output (e.g. at start) for the silence watchdog."""
        self.last_output = time.monotonic()

    def tail(self, stream: str = "stderr") -> str:
        """The last lines of `stream`, including an unterminated last line."""
        lines = list(self._tails[stream])
        if self._partial[stream]:
            lines.append(redact(self._partial[stream]))
        return "\n".join(lines[-(self._tails[stream].maxlen or 1) :])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def watch_silence(
    capture: LogCapture, limit: float, scope: anyio.CancelScope, fired: anyio.Event
) -> None:
    """Cancel `scope` (and set `fired`) once `capture` has seen no output for `limit` s."""
    while True:
        idle = time.monotonic() - capture.last_output
        if idle >= limit:
            fired.set()
            scope.cancel()
            return
        await anyio.sleep(min(1.0, limit - idle + 0.05))
