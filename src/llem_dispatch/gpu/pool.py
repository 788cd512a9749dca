"""The GPU pool: which device ids exist, and who may use which of them when.

Hands each experiment k distinct ids, keeps a cooldown gap per GPU, and queues
requests FIFO with bounded backfill so multi-GPU jobs never starve. An `early`
request may instead be promised the ids of a running lease of its size (its
successor), so it can start up before they free; it may use them only once
`GpuLease.wait_ready()` returns (released, cooled down, settled).

The async shell: the decisions are `Schedule`'s (schedule.py, pure), the device
reads `DeviceSensing`'s (sensing.py, off the event loop); this wires them to
waiting tasks and the clock (`anyio.current_time()`).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal, TypedDict, Unpack

import anyio
import anyio.lowlevel
import structlog

from llem_dispatch._cdi import is_gpu_uuid
from llem_dispatch.errors import ConfigError, GpuRequestError
from llem_dispatch.gpu.discovery import (
    match_visible,
    nvml_inventory,
    nvml_names,
    nvml_thermal,
    nvml_used_memory_mb,
    parse_visible_devices,
)
from llem_dispatch.gpu.lease import GpuLease
from llem_dispatch.gpu.schedule import NEVER, BusyMemory, GpuHolding, Grant, Request, Schedule, Step
from llem_dispatch.gpu.sensing import DeviceSensing, MemoryProbe
from llem_dispatch.gpu.thermal import Sensor, SettleSpec, SettleTracker

__all__ = ["GpuPool", "GpuPoolOptions"]

log = structlog.get_logger("llem_dispatch.gpu")


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
    NVML, no memory check. Probes (`memory_probe`, `sensor`; NVML's by default)
    are called on a worker thread, never on the event loop.
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
        # A virtual pool has no device to ask, so the checks are off whatever was set.
        check_memory = residual_memory_mb is not None and not virtual
        if settle is not None and virtual:
            log.warning(
                "gpu_settle_ignored",
                reason="virtual GPUs have no temperature or power to read",
            )
        gate = settle is not None and not virtual
        self._schedule = Schedule(
            ids,
            cooldown_s=self.cooldown_s,
            max_backfill=self.max_backfill,
            residual_memory_mb=residual_memory_mb if check_memory else None,
            on_busy_memory=on_busy_memory,
            memory_poll_s=memory_poll_s,
            settle=SettleTracker(settle) if settle is not None and gate else None,
        )
        self._sensing: DeviceSensing | None = None
        if check_memory or gate:
            self._sensing = DeviceSensing(
                memory=(memory_probe or nvml_used_memory_mb) if check_memory else None,
                thermal=(sensor or nvml_thermal) if gate else None,
            )
        # The event each sleeping waiter (a request, or a promise in `wait_ready`)
        # waits on: set only when a step wakes that one, so a release wakes one
        # task, not the whole queue.
        self._asleep: dict[Request | Grant, anyio.Event] = {}

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
    def named(cls, devices: Sequence[str | int], **options: Unpack[GpuPoolOptions]) -> GpuPool:
        """This host's GPUs `devices` (indices or UUIDs), each resolved to its UUID.

        GPUs are handed to runners by UUID, never by a guessable index: an index is
        resolved through NVML; a UUID is kept as given (and checked against NVML
        when NVML answers). Without NVML an index stays unresolved (it is handed
        over as written, and `gpu_devices: cdi` refuses it).
        """
        pool = cls(devices, **options)
        inventory, reason = nvml_inventory()
        by_index = dict(inventory or [])
        by_uuid = {u: i for i, u in by_index.items()}
        for gpu in pool.devices:
            known = by_index.get(gpu) or (gpu if gpu in by_uuid else None)
            if inventory is not None and known is None:
                listed = ", ".join(f"{i} ({u})" for i, u in by_index.items()) or "none"
                raise ConfigError(
                    f"gpus: {gpu} is not a GPU of this host (NVML lists: {listed})",
                    fix_suggestion="List this host's GPUs by index or UUID (`nvidia-smi -L`).",
                )
            if known is not None:
                pool.uuids[gpu] = known
            elif is_gpu_uuid(gpu):
                pool.uuids[gpu] = gpu
        if inventory is None:
            log.info("gpu_nvml_unavailable", reason=reason, resolved=sorted(pool.uuids))
            return pool
        index_of = {g: g if g in by_index else by_uuid[g] for g in pool.devices}
        names = nvml_names(list(index_of.values()))
        pool.names = {g: names[i] for g, i in index_of.items() if i in names}
        return pool

    def handed(self, ids: Iterable[str]) -> tuple[str, ...]:
        """What a runner is handed for these ids: each GPU's UUID where known, else its id."""
        return tuple(self.uuids.get(i, i) for i in ids)

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
        """Ids that are free and cooled down now (as last sensed), in pool order (for display)."""
        return self._schedule.free_ids(anyio.current_time())

    def busy(self) -> dict[str, GpuHolding]:
        """Held ids and who holds them since when, in pool order."""
        held = self._schedule.held
        return {d: held[d] for d in self.devices if d in held}

    @property
    def prestart_depth(self) -> int:
        """How many early (prestarted) leases may be promised behind each running one."""
        return self._schedule.depth

    @prestart_depth.setter
    def prestart_depth(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"prestart_depth must be >= 1, got {depth!r}")
        self._schedule.depth = depth

    async def deepen(self, depth: int) -> None:
        """Set `prestart_depth` and promise at once what the deeper chains now allow."""
        deeper = depth > self._schedule.depth
        self.prestart_depth = depth
        if deeper:
            await self._look()

    def promised(self) -> tuple[str, ...]:
        """Ids promised to a pending (prestarted) lease, in pool order."""
        return tuple(d for d in self.devices if d in self._schedule.promised)

    def waiting(self) -> tuple[int, ...]:
        """The GPU counts of the requests waiting, oldest first."""
        return tuple(r.k for r in self._schedule.queue)

    def last_released(self, device_id: str) -> float | None:
        """`anyio.current_time()` of the id's last release, or None if never released.

        The release itself (its holder's exit), where hand-off gaps count from; its
        cooldown may count from earlier (the end of the holder's work).
        """
        return self._schedule.last_released.get(device_id)

    @asynccontextmanager
    async def _lease(self, k: int, holder: str | None, early: bool) -> AsyncIterator[GpuLease]:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if k == 0:
            lease = GpuLease()
        else:
            grant = await self._wait_for(Request(k, holder, early))
            lease = GpuLease(
                grant.ids,
                grant=grant,
                on_release=functools.partial(self._release, grant),
                ready_wait=functools.partial(self._wait_ready, grant),
            )
        try:
            yield lease
        finally:
            lease.release()

    async def _wait_for(self, request: Request) -> Grant:
        schedule = self._schedule
        schedule.enqueue(request)
        try:
            await self._look()
            while request.grant is None:
                if schedule.unread and schedule.is_head(request):
                    await self._look()  # ids freed that must be sensed before they go
                    continue
                # Nobody releases anything when a cooldown ends or a memory
                # re-check or settle sample is due, so the head keeps the time for
                # everyone: it sleeps until the pool's next such moment and then
                # looks itself. The others sleep until a step wakes them.
                now = anyio.current_time()
                request.deadline = (
                    schedule.next_deadline(now) if schedule.is_head(request) else math.inf
                )
                with anyio.CancelScope(deadline=request.deadline) as timer:
                    await self._sleep(request)
                request.deadline = NEVER
                if request.grant is None and timer.cancelled_caught:
                    await self._look()
            # Granted, but the caller may have been cancelled meanwhile: then the
            # ids go back unused (no cooldown) instead of starting its work.
            await anyio.lowlevel.checkpoint_if_cancelled()
            return request.grant
        except BaseException:
            # Cancelled (or failed) while waiting: leave no trace in the queue,
            # and hand back ids granted in the instant before the cancellation.
            now = anyio.current_time()
            if request.grant is not None:
                self._apply(schedule.revoke(request.grant, now))
            else:
                self._apply(schedule.withdraw(request, now))
            raise

    async def _sleep(self, waiter: Request | Grant) -> None:
        """Until a step wakes `waiter` (or the caller's deadline passes)."""
        event = self._asleep[waiter] = anyio.Event()
        try:
            await event.wait()
        finally:
            # Two tasks may wait on one promise: leave the other's event alone.
            if self._asleep.get(waiter) is event:
                del self._asleep[waiter]

    async def _look(self) -> None:
        """One scheduling step now, with fresh readings of the ids it may hand out."""
        if self._sensing is None:
            self._apply(self._schedule.dispatch(anyio.current_time()))
            return
        readings = await self._sensing.read(self._schedule.to_sense(anyio.current_time()))
        step = self._schedule.dispatch(anyio.current_time(), readings)
        self._apply(step)
        await self._say_busy(step.busy)

    async def _wait_ready(self, grant: Grant) -> None:
        """Until a promise's ids are released, cooled down, settled and not in use."""
        schedule = self._schedule
        while grant.pending:
            now = anyio.current_time()
            ids = schedule.promise_to_sense(grant, now)
            if ids:
                readings = await self._sensing.read(ids) if self._sensing is not None else {}
                if not grant.pending:
                    return  # given up meanwhile
                step = schedule.activate(grant, anyio.current_time(), readings)
                self._apply(step)
                await self._say_busy(step.busy)
                if not grant.pending:
                    return
            with anyio.CancelScope(deadline=schedule.ready_deadline(grant, now)):
                await self._sleep(grant)

    def _release(self, grant: Grant, _lease: GpuLease, work_ended_s_ago: float) -> None:
        now = anyio.current_time()
        self._apply(self._schedule.release(grant, now, work_ended=now - work_ended_s_ago))

    def _apply(self, step: Step) -> None:
        """Wake the waiters a step served or asked to look again."""
        waiters: list[Request | Grant] = [*step.woken, *step.promises]
        for waiter in waiters:
            event = self._asleep.get(waiter)
            if event is not None:
                event.set()

    async def _say_busy(self, busy: list[BusyMemory]) -> None:
        for note in busy:
            if note.handed_out:
                log.warning(
                    "gpu_memory_in_use",
                    device=note.device,
                    used_mb=round(note.used_mb, 1),
                    threshold_mb=self.residual_memory_mb,
                    action="handed out anyway",
                )
                continue
            held_by = await self._sensing.processes(note.device) if self._sensing else []
            log.warning(
                "gpu_memory_in_use",
                device=note.device,
                used_mb=round(note.used_mb, 1),
                threshold_mb=self.residual_memory_mb,
                action=f"waiting, re-checked every {self.memory_poll_s} s",
                held_by=held_by or "unknown (no NVML process list)",
            )
