"""The lease: the device ids handed to one experiment, and how it gives them back.

A read-only view of the pool's `Grant` (is it pending, released, promised on,
how each id was handed on); the pool changes the grant, never the lease.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Self

from llem_dispatch.gpu.schedule import Grant
from llem_dispatch.gpu.thermal import SettleReport

__all__ = ["GpuLease"]

_NO_SETTLE: Mapping[str, SettleReport] = MappingProxyType({})


class GpuLease(tuple[str, ...]):
    """The device ids handed to one experiment: a tuple of str ids that can be released.

    `release()` returns the ids to the pool at once (their cooldown starts then),
    so a run can free its GPUs the moment its process exits, before logs are
    collected; leaving `GpuPool.acquire`'s block releases whatever is still held.
    """

    _on_release: Callable[[GpuLease, float], None] | None
    _released: bool
    _grant: Grant | None
    _ready_wait: Callable[[], Awaitable[None]] | None

    def __new__(
        cls,
        ids: Iterable[str] = (),
        *,
        on_release: Callable[[GpuLease, float], None] | None = None,
        grant: Grant | None = None,
        ready_wait: Callable[[], Awaitable[None]] | None = None,
    ) -> Self:
        """`grant` and `ready_wait` come from the pool: its state of these ids, and
        how to wait until a pending grant's ids are this lease's."""
        self = super().__new__(cls, ids)
        self._on_release = on_release
        self._released = False
        self._grant = grant
        self._ready_wait = ready_wait
        return self

    @property
    def released(self) -> bool:
        """Whether the ids have gone back to the pool (or were never used and taken back)."""
        return self._released or (self._grant is not None and self._grant.released)

    @property
    def pending(self) -> bool:
        """A promise: the ids are still another lease's (or cooling down); see `wait_ready`."""
        return self._grant is not None and self._grant.pending

    @property
    def has_successor(self) -> bool:
        """Whether an early request has been promised these ids next (prestart)."""
        return self._grant is not None and self._grant.successor is not None

    @property
    def settle(self) -> Mapping[str, SettleReport]:
        """With a thermal gate: each id's reading and settle wait as it was handed on."""
        if self._grant is None:
            return _NO_SETTLE
        return MappingProxyType(self._grant.settle)

    async def wait_ready(self) -> None:
        """Until the ids are this lease's to use (at once for a lease that is not pending)."""
        if self.pending and self._ready_wait is not None:
            await self._ready_wait()

    def release(self, *, work_ended_s_ago: float = 0.0) -> None:
        """Give the ids back to the pool now; later calls do nothing.

        `work_ended_s_ago`: the holder's work on them ended that long before its
        process exited (its `done` mark); their cooldown counts from then.
        """
        if self.released:
            return
        self._released = True
        if self._on_release is not None:
            self._on_release(self, work_ended_s_ago)

    def __repr__(self) -> str:
        return f"GpuLease({', '.join(map(repr, self))})"
