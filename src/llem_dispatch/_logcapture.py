"""Bounded capture of an experiment's output: streamed to a file, tail kept in memory.

A container may print gigabytes: the log file keeps its first and last
`max_bytes / 2` characters (the cut marked), memory keeps the last lines, and
secrets are redacted even when written in several pieces.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
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
        self._tail = _SpilledTail(path, max_bytes - max_bytes // 2)
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
        of it), then into a bounded tail kept on disk and appended at close."""
        if self._file is None or not text:
            return
        if self._head_left > 0:
            head, text = text[: self._head_left], text[self._head_left :]
            self._head_left -= len(head)
            self._file.write(head)
            self._file.flush()
        if text:
            self._tail.write(text)

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
        self._tail.append_to(self._file)
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


class _SpilledTail:
    """The last `limit` characters of a stream, kept on disk in two alternating files.

    Memory stays constant however much is written: each file holds up to `limit`
    characters; when the current one is full the other is emptied and takes over,
    so the two together always hold at least the last `limit` characters.
    """

    def __init__(self, log_path: Path, limit: int) -> None:
        self._paths = (log_path.with_name(".tail-a"), log_path.with_name(".tail-b"))
        self._limit = max(1, limit)
        self._current = 0
        self._sizes = [0, 0]
        self._total = 0
        self._file: IO[str] | None = None

    def write(self, text: str) -> None:
        while text:
            if self._file is None or self._sizes[self._current] >= self._limit:
                self._switch()
            assert self._file is not None
            room = self._limit - self._sizes[self._current]
            piece, text = text[:room], text[room:]
            self._file.write(piece)
            self._sizes[self._current] += len(piece)
            self._total += len(piece)

    def _switch(self) -> None:
        if self._file is not None:
            self._file.close()
            self._current = 1 - self._current
        self._sizes[self._current] = 0
        self._file = open(self._paths[self._current], "w", encoding="utf-8")  # noqa: SIM115

    def append_to(self, out: IO[str]) -> None:
        """Write the marker and the kept tail to `out`; remove the spill files."""
        if self._file is None:
            return
        self._file.close()
        previous = 1 - self._current
        from_previous = max(0, self._limit - self._sizes[self._current])
        skip_previous = max(0, self._sizes[previous] - from_previous)
        kept = min(self._total, self._limit)
        if self._total > kept:
            out.write(f"\n[... {self._total - kept} characters of output omitted ...]\n")
        if self._sizes[previous] and from_previous:
            with open(self._paths[previous], encoding="utf-8") as handle:
                handle.seek(0)
                _skip_chars(handle, skip_previous)
                shutil.copyfileobj(handle, out)
        with open(self._paths[self._current], encoding="utf-8") as handle:
            shutil.copyfileobj(handle, out)
        for path in self._paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _skip_chars(handle: IO[str], count: int) -> None:
    """Read past `count` characters of a text file, in bounded pieces."""
    while count > 0:
        got = len(handle.read(min(count, 1 << 20)))
        if not got:
            return
        count -= got
