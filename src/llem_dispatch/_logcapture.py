"""Bounded capture of an experiment's output: streamed to a file, tail kept in memory.

A container may print gigabytes: the log file keeps its first and last
`max_bytes / 2` characters (the cut marked), memory keeps the last lines, and
secrets are redacted even when written in several pieces.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import IO

import anyio

from llem_dispatch._logging import redact, redact_stream
from llem_dispatch.errors import STDERR_TAIL_LINES

__all__ = ["DEFAULT_MAX_LOG_BYTES", "LogCapture", "watch_silence"]

_MAX_LINE_CHARS = 4096
#: container.log keeps this much: the first half and the last half of the output.
DEFAULT_MAX_LOG_BYTES = 32 * 1024 * 1024


class LogCapture:
    """Writes stdout/stderr chunks to one log file; keeps the last lines of each stream."""

    def __init__(
        self,
        path: Path,
        *,
        tail_lines: int = STDERR_TAIL_LINES,
        max_bytes: int = DEFAULT_MAX_LOG_BYTES,
    ) -> None:
        self.path = path
        self._file: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._head_left = max_bytes // 2
        self._tail_limit = max_bytes - max_bytes // 2
        self._file_tail: collections.deque[str] = collections.deque()
        self._file_tail_size = 0
        self._omitted = 0
        self._held: dict[str, str] = {"stdout": "", "stderr": ""}
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
        ready, self._held[stream] = redact_stream(self._held[stream], chunk)
        self._write(ready)

    def _write(self, text: str) -> None:
        """To the file while its head lasts (flushed: a killed dispatcher loses nothing
        of it), then into a bounded tail written at close."""
        if self._file is None or not text:
            return
        if self._head_left > 0:
            head, text = text[: self._head_left], text[self._head_left :]
            self._head_left -= len(head)
            self._file.write(head)
            self._file.flush()
        if not text:
            return
        self._file_tail.append(text)
        self._file_tail_size += len(text)
        while self._file_tail_size > self._tail_limit:
            extra = self._file_tail_size - self._tail_limit
            first = self._file_tail[0]
            if len(first) <= extra:
                self._file_tail.popleft()
                self._file_tail_size -= len(first)
                self._omitted += len(first)
            else:
                self._file_tail[0] = first[extra:]
                self._file_tail_size -= extra
                self._omitted += extra

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
        """Write what is held back (redacted) and the kept tail; close the file."""
        if self._file is None:
            return
        for stream in ("stdout", "stderr"):
            self._write(redact(self._held[stream]))
            self._held[stream] = ""
        if self._omitted:
            self._file.write(f"\n[... {self._omitted} characters of output omitted ...]\n")
        self._file.write("".join(self._file_tail))
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
