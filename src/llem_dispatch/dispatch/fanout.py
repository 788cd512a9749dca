"""Bounded fan-out: a fixed set of workers over an iterable, results as they finish.

The one fan-out of the package: `Dispatcher.map` and `run_study` both use it, so
10k experiments never mean 10k waiting tasks, and a consumer that stops early
cancels what is in flight.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import TypeVar

import anyio

__all__ = ["fan_out"]

T = TypeVar("T")
R = TypeVar("R")


async def fan_out(
    items: Iterable[T], work: Callable[[T], Awaitable[R]], *, workers: int
) -> AsyncGenerator[R, None]:
    """Run `work(item)` for every item on at most `workers` tasks; yield results as they end.

    Items are taken in order; a small buffer makes finished results wait for the
    consumer instead of piling up. Wrap in `contextlib.aclosing(...)` when you may
    stop iterating early: closing the iterator cancels the work still in flight.
    """
    pending = iter(items)
    workers = max(1, workers)
    send, receive = anyio.create_memory_object_stream[R](workers)

    async def worker() -> None:
        for item in pending:
            await send.send(await work(item))

    async with anyio.create_task_group() as tg, receive:

        async def feed() -> None:
            async with send, anyio.create_task_group() as runs:
                for _ in range(workers):
                    runs.start_soon(worker)

        tg.start_soon(feed)
        try:
            async for result in receive:
                yield result
        except GeneratorExit:
            # The consumer stopped early: cancel what is in flight (cleanup of
            # each item, such as removing its container, is the work's own, shielded).
            tg.cancel_scope.cancel()
