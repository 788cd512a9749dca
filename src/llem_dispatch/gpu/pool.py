"""The GPU pool: which device ids exist, and who may use which of them when.

Hands each experiment k distinct ids, keeps a cooldown gap per GPU, and queues
requests FIFO with bounded backfill so multi-GPU jobs never starve. An `early`
request may instead be promised the ids of a running lease of its size (its
successor), so it can start up before they free; it may use them only once
`GpuLease.wait_ready()` returns (released, cooled down, settled).
"""

from __future__ import annotations

import itertools
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Literal, Self, TypedDict, Unpack

import anyio
import anyio.lowlevel
import structlog

from llem_dispatch.errors import ConfigError, GpuRequestError
from llem_dispatch.gpu.discovery import (
    match_visible,
    nvml_inventory,
    nvml_names,
    nvml_processes,
    nvml_thermal,
    nvml_used_memory_mb,
    parse_visible_devices,
)
from llem_dispatch.gpu.thermal import Sensor, SettleReport, SettleSpec, ThermalGate

__all__ = [
    "GpuHolding",
    "GpuLease",
    "GpuPool",
    "GpuPoolOptions",
]

log = structlog.get_logger("llem_dispatch.gpu")

MemoryProbe = Callable[[str], float | None]

_NEVER = -math.inf


class GpuLease(tuple[str, ...]):
    """The device ids handed to one experiment: a tuple of str ids that can be released.

    `release()` returns the ids to the pool at once (their cooldown starts then),
    so a run can free its GPUs the moment its process exits, before logs are
    collected; leaving `GpuPool.acquire`'s block releases whatever is still held.
    """

    _on_release: Callable[[GpuLease], None] | None
    _released: bool
    #: With a thermal gate: each id's reading and settle wait as it was handed on.
    settle: dict[str, SettleReport]
    # A promise (`pending`): how to wait until the ids are ours, and the event
    # that wakes that wait. A live lease: the pending lease promised its ids next.
    _ready_wait: Callable[[GpuLease], Awaitable[None]] | None
    _wake: anyio.Event | None
    _successor: GpuLease | None

    def __new__(
        cls, ids: Iterable[str] = (), *, on_release: Callable[[GpuLease], None] | None = None
    ) -> Self:
        lease = super().__new__(cls, ids)
        lease._on_release = on_release
        lease._released = False
        lease.settle = {}
        lease._ready_wait = None
        lease._wake = None
        lease._successor = None
        return lease

    @property
    def released(self) -> bool:
        """Whether the ids have gone back to the pool."""
        return self._released

    @property
    def pending(self) -> bool:
        """A promise: the ids are still another lease's (or cooling down); see `wait_ready`."""
        return self._ready_wait is not None

    async def wait_ready(self) -> None:
        """Until the ids are this lease's to use (at once for a lease that is not pending)."""
        if self._ready_wait is not None:
            await self._ready_wait(self)

    def release(self) -> None:
        """Give the ids back to the pool now; later calls do nothing."""
        if self._released:
            return
        self._released = True
        if self._on_release is not None:
            self._on_release(self)

    def __repr__(self) -> str:
        return f"GpuLease({', '.join(map(repr, self))})"


@dataclass(frozen=True, slots=True)
class GpuHolding:
    """Who holds one busy id, for progress displays."""

    #: Every id of the lease that holds this one, in pool order.
    lease_ids: tuple[str, ...]
    #: `anyio.current_time()` when the lease was granted.
    since: float
    #: The label passed to `GpuPool.acquire(k, holder=...)`, if any.
    holder: str | None = None


class GpuPoolOptions(TypedDict, total=False):
    """Keyword options of `GpuPool`, as `detect` and `virtual_devices` pass them on."""

    cooldown_s: float
    max_backfill: int | None
    residual_memory_mb: float | None
    on_busy_memory: Literal["wait", "warn"]
    memory_probe: MemoryProbe | None
    memory_poll_s: float
    settle: SettleSpec | None
    sensor: Sensor | None


@dataclass(slots=True, eq=False)
class _Request:
    k: int
    holder: str | None
    #: May be promised a running lease's ids (a pending lease) instead of waiting.
    early: bool = False
    # Times later requests were granted ahead of this one while it was the head.
    jumps: int = 0
    lease: GpuLease | None = None
    # Set when this request is granted, or when it must re-read its deadline;
    # a fresh one for each wait. Only its own waiter waits on it.
    event: anyio.Event | None = None
    # The deadline its waiter is sleeping until: the pool's next cooldown end
    # or memory re-check for the head, +inf for the others, -inf while it is
    # not asleep (not yet waiting, or woken and about to look again).
    deadline: float = -math.inf

    def wake(self) -> None:
        self.deadline = -math.inf
        if self.event is not None:
            self.event.set()


class GpuPool:
    """A fixed set of device ids handed out k at a time, never one id to two holders.

    `async with pool.acquire(k) as ids:` waits until k ids are free and cooled
    down. Requests are served first come, first served; while the oldest one
    cannot be met, later requests that fit may go ahead of it, but at most
    `max_backfill` times (default: the pool size), after which freed ids are
    kept for it. An id released at time t is handed out again at
    t + `cooldown_s` at the earliest, so energy measurements start on a GPU that
    has settled. With `residual_memory_mb`, an id whose device still holds more
    memory than that (another process, a leaked context) is waited out
    (`on_busy_memory="wait"`, re-checked every `memory_poll_s`) or handed out
    with a warning (`"warn"`). A virtual pool has no devices behind its ids: no
    NVML, no memory check.
    """

    devices: tuple[str, ...]
    virtual: bool
    cooldown_s: float
    uuids: dict[str, str]
    #: NVML product names ('NVIDIA H200') by id, where NVML knows them.
    names: dict[str, str]

    def __init__(
        self,
        devices: Sequence[str | int],
        *,
        cooldown_s: float = 0.0,
        max_backfill: int | None = None,
        residual_memory_mb: float | None = None,
        on_busy_memory: Literal["wait", "warn"] = "wait",
        memory_probe: MemoryProbe | None = None,
        memory_poll_s: float = 1.0,
        settle: SettleSpec | None = None,
        sensor: Sensor | None = None,
        virtual: bool = False,
    ) -> None:
        ids = tuple(str(d).strip() for d in devices)
        if any(not d for d in ids):
            raise ConfigError(f"GPU device ids must not be empty, got {list(ids)}")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"GPU device ids must be distinct, got {list(ids)}")
        if cooldown_s < 0 or not math.isfinite(cooldown_s):
            raise ConfigError(f"cooldown_s must be a finite number >= 0, got {cooldown_s}")
        if max_backfill is not None and max_backfill < 0:
            raise ConfigError(f"max_backfill must be >= 0, got {max_backfill}")
        if on_busy_memory not in {"wait", "warn"}:
            raise ConfigError(f"on_busy_memory must be 'wait' or 'warn', got {on_busy_memory!r}")
        if memory_poll_s <= 0:
            raise ConfigError(f"memory_poll_s must be > 0, got {memory_poll_s}")
        self.devices = ids
        self.virtual = virtual
        self.cooldown_s = float(cooldown_s)
        self.uuids = {}
        self.names = {}
        self.max_backfill = len(ids) if max_backfill is None else max_backfill
        self.residual_memory_mb = residual_memory_mb
        self.on_busy_memory = on_busy_memory
        self.memory_poll_s = memory_poll_s
        # A virtual pool has no device to ask, so the check is off whatever was set.
        self._probe: MemoryProbe | None = None
        if residual_memory_mb is not None and not virtual:
            self._probe = memory_probe or nvml_used_memory_mb
        self._gate: ThermalGate | None = None
        if settle is not None and virtual:
            log.warning(
                "gpu_settle_ignored",
                reason="virtual GPUs have no temperature or power to read",
            )
        elif settle is not None:
            self._gate = ThermalGate(settle, sensor or nvml_thermal)
        self._position = {d: i for i, d in enumerate(ids)}
        self._held: dict[str, GpuHolding] = {}
        self._last_released: dict[str, float] = {}
        self._memory_blocked_until: dict[str, float] = {}
        self._memory_flagged: set[str] = set()
        self._queue: deque[_Request] = deque()
        # Granted leases not yet released, oldest first (successors are promised
        # from these), and the ids promised to a pending lease.
        self._live: list[GpuLease] = []
        self._promised: dict[str, GpuLease] = {}
        self._has_early = False
        # When `_dispatch` last looked (`_next_deadline` counts only later moments).
        self._looked_at = -math.inf

    @classmethod
    def detect(cls, **options: Unpack[GpuPoolOptions]) -> GpuPool:
        """The GPUs of this host: NVML's, else CUDA_VISIBLE_DEVICES's, else none.

        NVML ids are device indices ("0", "1", ...) with their UUIDs in `uuids`;
        a set CUDA_VISIBLE_DEVICES narrows them, as it would for CUDA. Without
        NVML (not installed, no driver) the ids are CUDA_VISIBLE_DEVICES's entries
        as written. Never raises for a missing or broken NVML: the reason is logged.
        """
        visible = parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
        inventory, reason = nvml_inventory()
        uuids: dict[str, str] = {}
        if inventory is not None:
            source = "nvml"
            uuids = dict(inventory)
            ids = list(uuids) if visible is None else match_visible(visible, uuids)
            uuids = {i: u for i, u in uuids.items() if i in ids}
        elif visible is not None:
            source = "CUDA_VISIBLE_DEVICES"
            ids = visible
            log.info("gpu_nvml_unavailable", reason=reason, fallback=source)
        else:
            source = "none"
            ids = []
            log.info("gpu_nvml_unavailable", reason=reason, fallback="empty pool")
        pool = cls(ids, **options)
        pool.uuids = uuids
        pool.names = nvml_names(list(uuids))
        log.info("gpu_pool_detected", source=source, devices=list(pool.devices))
        return pool

    @classmethod
    def virtual_devices(cls, n: int, **options: Unpack[GpuPoolOptions]) -> GpuPool:
        """A pool of n declared ids "0".."n-1" with no devices behind them (CI, laptops)."""
        if n < 0:
            raise ConfigError(f"the number of virtual GPUs must be >= 0, got {n}")
        return cls([str(i) for i in range(n)], virtual=True, **options)

    @property
    def size(self) -> int:
        """How many ids the pool has."""
        return len(self.devices)

    def __repr__(self) -> str:
        kind = "virtual " if self.virtual else ""
        return f"<GpuPool {kind}{list(self.devices)} cooldown_s={self.cooldown_s}>"

    def check_request(self, k: int) -> None:
        """Raise now if a request for k GPUs could never be met by this pool."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"the number of GPUs must be an int, got {k!r}")
        if k < 0:
            raise ValueError(f"the number of GPUs must be >= 0, got {k}")
        if k == 0 or k <= self.size:
            return
        if self.size == 0:
            raise GpuRequestError(
                f"an experiment asked for {k} GPU(s) but no GPUs were found "
                "(no NVML devices, CUDA_VISIBLE_DEVICES unset or empty)",
                fix_suggestion=(
                    "Run on a host with GPUs, list them explicitly, or declare virtual "
                    "ones: `--virtual-gpus N` on the command line, "
                    "`GpuPool.virtual_devices(n)` in Python."
                ),
            )
        raise GpuRequestError(
            f"an experiment asked for {k} GPUs but the pool has only {self.size} "
            f"({', '.join(self.devices)})"
        )

    def acquire(
        self, k: int, *, holder: str | None = None, early: bool = False
    ) -> AbstractAsyncContextManager[GpuLease]:
        """Wait for k distinct free, cooled-down ids; hold them for the block.

        A request that can never be met raises `GpuRequestError` here, not after
        a wait; k == 0 gives an empty lease at once. `holder` only labels the ids
        in `busy()`. Leaving the block (normally, by an exception or by
        cancellation) releases the lease if it was not released before.

        With `early`, while no k ids are free the request may instead be promised
        the ids of a running k-id lease (oldest first, one successor each; a
        promise made past the oldest waiting request counts as a backfill): the
        lease is then `pending`, and its ids may be used only once
        `await lease.wait_ready()` has returned. Giving up a pending lease frees
        the promise, with no cooldown.
        """
        self.check_request(k)
        return self._lease(k, holder, early)

    def free_ids(self) -> tuple[str, ...]:
        """Ids that are free and cooled down now, in pool order (for display)."""
        now = anyio.current_time()
        return tuple(
            d for d in self.devices if d not in self._promised and self._is_available(d, now)
        )

    def busy(self) -> dict[str, GpuHolding]:
        """Held ids and who holds them since when, in pool order."""
        return {d: self._held[d] for d in self.devices if d in self._held}

    def waiting(self) -> tuple[int, ...]:
        """The GPU counts of the requests waiting, oldest first."""
        return tuple(r.k for r in self._queue)

    def last_released(self, device_id: str) -> float | None:
        """`anyio.current_time()` of the id's last release, or None if never released."""
        return self._last_released.get(device_id)

    @asynccontextmanager
    async def _lease(self, k: int, holder: str | None, early: bool) -> AsyncIterator[GpuLease]:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if k == 0:
            lease = GpuLease()
        else:
            self._has_early = self._has_early or early
            lease = await self._wait_for(_Request(k, holder, early))
        try:
            yield lease
        finally:
            lease.release()

    async def _wait_for(self, request: _Request) -> GpuLease:
        self._queue.append(request)
        try:
            self._dispatch()
            while request.lease is None:
                # Each waiter sleeps on its own event, set only when it is
                # granted (or made the head), so a release wakes one task, not
                # the whole queue. Nobody releases anything when a cooldown ends
                # or a memory re-check is due, so the head keeps the time for
                # everyone: it sleeps until the pool's next such moment and then
                # runs the scheduling step itself.
                request.event = anyio.Event()
                is_head = self._queue[0] is request
                request.deadline = self._next_deadline() if is_head else math.inf
                with anyio.CancelScope(deadline=request.deadline) as timer:
                    await request.event.wait()
                request.deadline = -math.inf
                if request.lease is None and timer.cancelled_caught:
                    self._dispatch()
            # Granted, but the caller may have been cancelled meanwhile: then the
            # ids go back unused (no cooldown) instead of starting its work.
            await anyio.lowlevel.checkpoint_if_cancelled()
            return request.lease
        except BaseException:
            # Cancelled (or failed) while waiting: leave no trace in the queue,
            # and hand back ids granted in the instant before the cancellation.
            if request.lease is not None:
                self._revoke(request.lease)
            else:
                self._queue.remove(request)
                self._dispatch()
            raise

    def _is_available(self, device_id: str, now: float) -> bool:
        if device_id in self._held:
            return False
        released = self._last_released.get(device_id, _NEVER)
        blocked = self._memory_blocked_until.get(device_id, _NEVER)
        if now < released + self.cooldown_s or now < blocked:
            return False
        return (
            self._gate is None or released == _NEVER or self._gate.ready(device_id, released, now)
        )

    def _candidates(self, now: float) -> list[str]:
        # Longest-free first spreads the heat; never-used ids tie, lowest first.
        free = [d for d in self.devices if d not in self._promised and self._is_available(d, now)]
        free.sort(key=lambda d: (self._last_released.get(d, _NEVER), self._position[d]))
        return free

    def _next_deadline(self) -> float:
        """The next cooldown end, memory re-check or settle sample the last look missed.

        A moment already past counts while no `_dispatch` has looked since: the
        clock moves between a look and this call, and a head woken late must
        look at once rather than sleep with no deadline.
        """
        now = anyio.current_time()
        times = [
            t
            for d in self.devices
            if d not in self._held
            for t in (
                self._last_released.get(d, _NEVER) + self.cooldown_s,
                self._memory_blocked_until.get(d, _NEVER),
                self._settle_check(d, now),
            )
            if t > self._looked_at
        ]
        return min(times, default=math.inf)

    def _settle_check(self, device_id: str, now: float) -> float:
        """When a settling GPU should be looked at again (its next sample), else -inf."""
        released = self._last_released.get(device_id)
        if self._gate is None or released is None:
            return _NEVER
        when = self._gate.next_check(device_id, released, now)
        return when if when > now else now + self._gate.spec.sample_s

    def _dispatch(self) -> None:
        """Grant what can be granted now: the head first, then bounded backfill."""
        now = self._looked_at = anyio.current_time()
        free = self._candidates(now)
        while self._queue and free:
            head = self._queue[0]
            taken = self._take(head.k, free, now)
            if taken is None:
                break
            self._queue.popleft()
            self._grant(head, taken, now)
        if self._queue and free:
            head = self._queue[0]
            # Walk the queue in place (no copy of it per release): the walk
            # stops as soon as nothing is free or the head may not be jumped.
            backfilled: list[tuple[_Request, list[str]]] = []
            for request in itertools.islice(self._queue, 1, None):
                if head.jumps >= self.max_backfill or not free:
                    break
                taken = self._take(request.k, free, now)
                if taken is not None:
                    head.jumps += 1
                    backfilled.append((request, taken))
            for request, taken in backfilled:
                self._queue.remove(request)
                self._grant(request, taken, now)
        if self._has_early and self._queue:
            self._promise_successors()
        self._arm_timer()

    def _promise_successors(self) -> None:
        """Promise running leases' ids to early requests of their size, FIFO, bounded."""
        open_leases = [lease for lease in self._live if lease._successor is None]
        head = self._queue[0]
        promised: list[tuple[_Request, GpuLease]] = []
        for request in self._queue:
            if not open_leases or (request is not head and head.jumps >= self.max_backfill):
                break
            if not request.early:
                continue
            lease = next((o for o in open_leases if len(o) == request.k), None)
            if lease is None:
                continue
            open_leases.remove(lease)
            if request is not head:
                head.jumps += 1
            promised.append((request, lease))
        for request, predecessor in promised:
            self._queue.remove(request)
            lease = GpuLease(predecessor, on_release=self._release)
            lease._ready_wait = self._wait_ready
            predecessor._successor = lease
            for d in lease:
                self._promised[d] = lease
            request.lease = lease
            request.wake()

    async def _wait_ready(self, lease: GpuLease) -> None:
        """Until a promise's ids are released, cooled down, settled and not in use."""
        while lease._ready_wait is not None:
            now = anyio.current_time()
            if all(self._is_available(d, now) for d in lease) and all(
                self._memory_ok(d, now) for d in lease
            ):
                self._activate(lease, now)
                return
            lease._wake = anyio.Event()
            with anyio.CancelScope(deadline=self._ready_deadline(lease, now)):
                await lease._wake.wait()

    def _ready_deadline(self, lease: GpuLease, now: float) -> float:
        """When a promise should look again: never before its predecessor's release."""
        if any(d in self._held for d in lease):
            return math.inf
        times = [
            t
            for d in lease
            for t in (
                self._last_released.get(d, _NEVER) + self.cooldown_s,
                self._memory_blocked_until.get(d, _NEVER),
                self._settle_check(d, now),
            )
            if t > now
        ]
        return min(times, default=now + self.memory_poll_s)

    def _activate(self, lease: GpuLease, now: float) -> None:
        """A promise's ids become its own: held from now on, like a grant."""
        lease._ready_wait = None
        holding = GpuHolding(tuple(lease), now, None)
        for d in lease:
            del self._promised[d]
            self._held[d] = holding
        if self._gate is not None:
            lease.settle = {
                d: self._gate.hand_on(d, self._last_released.get(d), now) for d in lease
            }
        self._live.append(lease)
        self._dispatch()

    def _abandon(self, lease: GpuLease) -> None:
        """A promise given up before it was ready: its ids are as they were, no cooldown."""
        lease._ready_wait = None
        for d in lease:
            if self._promised.get(d) is lease:
                del self._promised[d]
        for live in self._live:
            if live._successor is lease:
                live._successor = None
        if lease._wake is not None:
            lease._wake.set()
        self._dispatch()

    def _arm_timer(self) -> None:
        """Make sure the head wakes by the next cooldown end or memory re-check.

        The head may be new (the one before it was granted or gave up, and it
        went to sleep with no deadline), or a release may have started a
        cooldown that ends before the head's deadline: either way it is woken
        to look again. Without such a moment due, nothing needs a timer.
        """
        if self._queue:
            head = self._queue[0]
            if self._next_deadline() < head.deadline:
                head.wake()

    def _take(self, k: int, free: list[str], now: float) -> list[str] | None:
        """Remove and return k usable ids from `free`, or None (leaving it usable)."""
        if k > len(free):
            return None
        chosen: list[str] = []
        for device_id in list(free):
            if not self._memory_ok(device_id, now):
                free.remove(device_id)
                continue
            chosen.append(device_id)
            if len(chosen) == k:
                for d in chosen:
                    free.remove(d)
                return chosen
        return None

    def _grant(self, request: _Request, ids: list[str], now: float) -> None:
        ids.sort(key=self._position.__getitem__)
        lease = GpuLease(ids, on_release=self._release)
        if self._gate is not None:
            lease.settle = {d: self._gate.hand_on(d, self._last_released.get(d), now) for d in ids}
        holding = GpuHolding(tuple(ids), now, request.holder)
        for d in ids:
            self._held[d] = holding
        self._live.append(lease)
        request.lease = lease
        request.wake()

    def _release(self, lease: GpuLease) -> None:
        if lease._ready_wait is not None:
            self._abandon(lease)
            return
        now = anyio.current_time()
        for d in lease:
            del self._held[d]
            self._last_released[d] = now
            if self._gate is not None:
                self._gate.released(d)
        self._live.remove(lease)
        successor = lease._successor
        if successor is not None and successor._wake is not None:
            successor._wake.set()
        self._dispatch()

    def _revoke(self, lease: GpuLease) -> None:
        # Never used, so no cooldown: the ids are as free as before the grant.
        lease._on_release = None
        lease.release()
        if lease._ready_wait is not None:
            self._abandon(lease)
            return
        for d in lease:
            del self._held[d]
        self._live.remove(lease)
        if lease._successor is not None and lease._successor._wake is not None:
            lease._successor._wake.set()
        self._dispatch()

    def _memory_ok(self, device_id: str, now: float) -> bool:
        if self._probe is None or self.residual_memory_mb is None:
            return True
        try:
            used = self._probe(device_id)
        except Exception as exc:  # noqa: BLE001 - a broken probe must not stall the pool
            log.warning("gpu_memory_probe_failed", device=device_id, error=repr(exc))
            used = None
        if used is None or used <= self.residual_memory_mb:
            self._memory_flagged.discard(device_id)
            return True
        if self.on_busy_memory == "warn":
            log.warning(
                "gpu_memory_in_use",
                device=device_id,
                used_mb=round(used, 1),
                threshold_mb=self.residual_memory_mb,
                action="handed out anyway",
            )
            return True
        self._memory_blocked_until[device_id] = now + self.memory_poll_s
        if device_id not in self._memory_flagged:
            # Once per busy spell, not once per poll.
            self._memory_flagged.add(device_id)
            log.warning(
                "gpu_memory_in_use",
                device=device_id,
                used_mb=round(used, 1),
                threshold_mb=self.residual_memory_mb,
                action=f"waiting, re-checked every {self.memory_poll_s} s",
                held_by=nvml_processes(device_id) or "unknown (no NVML process list)",
            )
        return False
