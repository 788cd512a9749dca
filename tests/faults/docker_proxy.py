"""A fault proxy in front of the real Docker daemon: stalls chosen API calls on demand.

A hung daemon cannot be made on demand, so this stands in for one, the way
toxiproxy does for TCP: a unix-socket HTTP proxy that forwards to the real
socket and holds back requests matching a rule, unanswered, until the rule is
lifted (then they are dropped, and later ones go through) or forever. Each
client connection carries one request (the proxy asks for `Connection: close`),
except an attach, which is upgraded and piped raw.

Runs its own event loop in a thread, so both in-process tests and CLI
subprocesses (through DOCKER_HOST) can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REAL_SOCKET = "/var/run/docker.sock"


@dataclass
class _Rule:
    method: str
    path: re.Pattern[str]
    released: asyncio.Event
    held: int = 0


@dataclass
class DockerFaultProxy:
    """`with DockerFaultProxy(path) as proxy:`; `proxy.url` is a DOCKER_HOST value."""

    path: Path
    target: str = REAL_SOCKET
    requests: list[str] = field(default_factory=list)
    _rules: list[_Rule] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    # -- control (from any thread) ---------------------------------------------------

    def stall(self, method: str, path_pattern: str) -> None:
        """Hold back every `method` request whose path matches, until `release()`."""
        assert self._loop is not None

        def add() -> None:
            self._rules.append(_Rule(method, re.compile(path_pattern), asyncio.Event()))

        self._call(add)

    def release(self) -> None:
        """Lift every stall: later requests go through; those held are dropped, unanswered."""

        def lift() -> None:
            for rule in self._rules:
                rule.released.set()
            self._rules.clear()

        self._call(lift)

    def held(self) -> int:
        """How many requests are being held right now."""
        return sum(rule.held for rule in list(self._rules))

    def seen(self, method: str, path_pattern: str) -> int:
        pattern = re.compile(path_pattern)
        return sum(
            1
            for line in list(self.requests)
            if line.split(" ")[0] == method and pattern.search(line.split(" ")[1])
        )

    def _call(self, fn: object) -> None:
        assert self._loop is not None
        done = threading.Event()

        def run() -> None:
            fn()  # type: ignore[operator]
            done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    # -- life ---------------------------------------------------------------------------

    def __enter__(self) -> DockerFaultProxy:
        self._thread = threading.Thread(target=self._serve_forever, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self.release()
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve_forever(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        server = loop.run_until_complete(asyncio.start_unix_server(self._client, str(self.path)))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            # Let every connection task run its `finally` (closing its sockets).
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(server.wait_closed())
            loop.close()

    # -- one client connection ---------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio keeps only weak references to tasks: hold each connection's task
        # so that none is collected while it waits on a closed peer.
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        self.requests.append(request_line)
        method, path = [*request_line.split(" "), "", ""][:2]
        for rule in list(self._rules):
            if rule.method == method and rule.path.search(path):
                rule.held += 1
                try:
                    # Never forwarded, as a hung daemon never answers it: the
                    # connection closes when the client gives up or at release.
                    await _hold(rule.released, reader)
                    return
                finally:
                    rule.held -= 1
        await self._forward(_connection_close(head), reader, writer)

    async def _forward(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            return
        try:
            up_writer.write(head)
            await asyncio.gather(
                _pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()


async def _hold(released: asyncio.Event, reader: asyncio.StreamReader) -> None:
    """Until the release, or until the client closes its end, whichever comes first."""
    wait = asyncio.ensure_future(released.wait())
    gone = asyncio.ensure_future(reader.read(1))
    try:
        await asyncio.wait({wait, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (wait, gone):
            task.cancel()
        await asyncio.gather(wait, gone, return_exceptions=True)


def _connection_close(head: bytes) -> bytes:
    """One request per connection, unless it upgrades (attach), which must stay open."""
    lines = head.split(b"\r\n")
    if any(line.lower().startswith(b"upgrade:") for line in lines):
        return head
    kept = [line for line in lines if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*kept[:-2], b"Connection: close", b"", b""])


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while chunk := await src.read(65536):
            dst.write(chunk)
            await dst.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if dst.can_write_eof():
                dst.write_eof()


@contextlib.contextmanager
def fault_proxy(tmp_dir: Path) -> Iterator[DockerFaultProxy]:
    """A started proxy with its socket in `tmp_dir` (unix socket paths must be short)."""
    with DockerFaultProxy(tmp_dir / "docker.sock") as proxy:
        yield proxy
