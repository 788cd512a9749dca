"""GPU scheduling, pure: which ids go to which request, and when.

Plain state and plain values: time comes in as `now`, device readings (memory,
temperature, power) as values someone else has taken; nothing here sleeps,
logs, or asks a device. The async `GpuPool` (pool.py) wires this to tasks, the
clock and the sensors, and `tests/unit/gpu/test_schedule.py` drives it directly.

Requests are served first come, first served; while the oldest one cannot be
met, later ones that fit may go ahead of it, but at most `max_backfill` times.
An id released at t is handed out again at t + `cooldown_s` at the earliest
(and, with a settle tracker, once settled); t is the end of its holder's work
where the release says when that was (the cooldown then counts from there,
the id still frees only at its release). An `early` request may instead be
promised the ids of a running grant of its size (its successor): a pending
grant, which becomes held once `activate` finds its ids released, cooled and
settled.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from llem_dispatch.gpu.thermal import SettleReport, SettleTracker

__all__ = [
    "NEVER",
    "BusyMemory",
    "GpuHolding",
    "Grant",
    "Reading",
    "Request",
    "Schedule",
    "Step",
]

#: The time of something that never happened (an id never released, never blocked).
NEVER = -math.inf


@dataclass(frozen=True, slots=True)
class Reading:
    """What one device said when it was last sensed; None where it could not tell."""

    #: Memory in use, MiB.
    memory_mb: float | None = None
    #: (temperature in C, power in W).
    thermal: tuple[float, float] | None = None


@dataclass(frozen=True, slots=True)
class GpuHolding:
    """Who holds one busy id, for progress displays."""

    #: Every id of the lease that holds this one, in pool order.
    lease_ids: tuple[str, ...]
    #: `anyio.current_time()` when the lease was granted.
    since: float
    #: The label passed to `GpuPool.acquire(k, holder=...)`, if any.
    holder: str | None = None


@dataclass(slots=True, eq=False)
class Grant:
    """Ids handed to one request: held by it, or (`pending`) promised to it next."""

    ids: tuple[str, ...]
    #: A promise: the ids are still another grant's, or cooling down or settling.
    pending: bool = False
    #: Given back (or, for a promise, given up); never handed back twice.
    released: bool = False
    #: The pending grant promised these ids next, if any.
    successor: Grant | None = None
    #: With a settle tracker: each id's reading and settle wait as it was handed on.
    settle: dict[str, SettleReport] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Request:
    """One waiting request for k ids; `grant` is set when it is served."""

    k: int
    holder: str | None = None
    #: May be promised a running grant's ids (a pending grant) instead of waiting.
    early: bool = False
    #: Times later requests were served ahead of this one while it was the head.
    jumps: int = 0
    grant: Grant | None = None
    #: When its waiter sleeps until (the shell's note): the next moment something
    #: may change for the head, +inf for the others, -inf while it is not asleep.
    deadline: float = NEVER


@dataclass(frozen=True, slots=True)
class BusyMemory:
    """A device found holding more memory than `residual_memory_mb` allows: to be said."""

    device: str
    used_mb: float
    #: True with `on_busy_memory="warn"` (handed out anyway), False when it is waited out.
    handed_out: bool


@dataclass(slots=True)
class Step:
    """What a scheduling step changed, for the shell to act on."""

    #: Requests to wake: served, or the head that must look again.
    woken: list[Request] = field(default_factory=list)
    #: Pending grants whose waiters must look again (their ids were released).
    promises: list[Grant] = field(default_factory=list)
    #: Busy devices to report (once per busy spell, or at each hand-out with "warn").
    busy: list[BusyMemory] = field(default_factory=list)

    def extend(self, other: Step) -> None:
        """Add another step's changes to this one."""
        self.woken.extend(other.woken)
        self.promises.extend(other.promises)
        self.busy.extend(other.busy)


_NO_READINGS: Mapping[str, Reading] = {}


class Schedule:
    """The pool's scheduling state and decisions, on plain values.

    With `senses` (a memory check or a settle tracker), an id is handed out only
    in a step given a fresh `Reading` of it; a step without one leaves `unread`
    set and wakes the head, whose waiter senses `to_sense(now)` and steps again.
    """

    def __init__(
        self,
        devices: Sequence[str],
        *,
        cooldown_s: float = 0.0,
        max_backfill: int | None = None,
        residual_memory_mb: float | None = None,
        on_busy_memory: Literal["wait", "warn"] = "wait",
        memory_poll_s: float = 1.0,
        settle: SettleTracker | None = None,
    ) -> None:
        self.devices = tuple(devices)
        self.cooldown_s = cooldown_s
        self.max_backfill = len(self.devices) if max_backfill is None else max_backfill
        self.residual_memory_mb = residual_memory_mb
        self.on_busy_memory = on_busy_memory
        self.memory_poll_s = memory_poll_s
        self.settle = settle
        #: Whether ids must be sensed before they are handed out.
        self.senses = residual_memory_mb is not None or settle is not None
        #: A step wanted to hand out an id it had no reading of: sense and step again.
        self.unread = False
        self.position = {d: i for i, d in enumerate(self.devices)}
        self.held: dict[str, GpuHolding] = {}
        #: When each id was last released (its holder's exit): what hand-off gaps count from.
        self.last_released: dict[str, float] = {}
        #: When each id's cooldown (and settling) counts from: the end of its last
        #: holder's work (its `done` mark) where known, else its release.
        self.cooling_since: dict[str, float] = {}
        self.memory_blocked_until: dict[str, float] = {}
        self.memory_flagged: set[str] = set()
        self.queue: deque[Request] = deque()
        #: Granted, unreleased grants, oldest first (successors are promised from these).
        self.live: list[Grant] = []
        #: Ids promised to a pending grant.
        self.promised: dict[str, Grant] = {}
        self.has_early = False
        #: How many pending grants may queue behind one running grant (prestart depth):
        #: each is promised the ids after the one before it.
        self.depth = 1
        #: When the last step looked (`next_deadline` counts only later moments).
        self.looked_at = NEVER

    # -- reading the state ----------------------------------------------------

    def available(self, device_id: str, now: float) -> bool:
        """Not held, cooled down, not blocked for its memory, and settled."""
        if device_id in self.held:
            return False
        released = self.cooling_since.get(device_id, NEVER)
        if now < released + self.cooldown_s:
            return False
        if now < self.memory_blocked_until.get(device_id, NEVER):
            return False
        return (
            self.settle is None or released == NEVER or self.settle.ready(device_id, released, now)
        )

    def free_ids(self, now: float) -> tuple[str, ...]:
        """Ids free and cooled down now (as last sensed), in pool order."""
        return tuple(d for d in self.devices if d not in self.promised and self.available(d, now))

    def is_head(self, request: Request) -> bool:
        """Whether `request` is the oldest waiting one."""
        return bool(self.queue) and self.queue[0] is request

    def to_sense(self, now: float) -> tuple[str, ...]:
        """The ids a step at `now` may hand out, to be sensed first (none without `senses`).

        Those free of holders, promises, cooldown and memory blocks, whatever their
        settle state: a settling id needs a sample, a settled one a hand-on reading.
        While no waiting request could be met by that many, only the settling ones:
        their calm streak must be sampled all along, or it would start only once
        the last id a request waits for is free.
        """
        if not self.senses or not self.queue:
            return ()
        ids = tuple(d for d in self.devices if d not in self.promised and self._cooled(d, now))
        if min(r.k for r in self.queue) <= len(ids):
            return ids
        if self.settle is None:
            return ()
        max_s = self.settle.spec.max_s
        return tuple(d for d in ids if now - self.cooling_since.get(d, -math.inf) < max_s)

    def promise_to_sense(self, grant: Grant, now: float) -> tuple[str, ...]:
        """The ids of a pending grant, first in line for them, once all are released and
        cooled, else ()."""
        first = all(self.promised.get(d) is grant for d in grant.ids)
        if first and all(self._cooled(d, now) for d in grant.ids):
            return grant.ids
        return ()

    def next_deadline(self, now: float) -> float:
        """The next cooldown end, memory re-check or settle sample the last look missed.

        A moment already past counts while no step has looked since: the clock
        moves between a look and this call, and a head woken late must look at
        once rather than sleep with no deadline.
        """
        times = [
            t
            for d in self.devices
            if d not in self.held
            for t in self._moments(d, now)
            if t > self.looked_at
        ]
        return min(times, default=math.inf)

    def ready_deadline(self, grant: Grant, now: float) -> float:
        """When a pending grant should look again: never before its ids are released,
        nor while an earlier promise of them is pending (it is woken after that one)."""
        if any(d in self.held or self.promised.get(d) is not grant for d in grant.ids):
            return math.inf
        times = [t for d in grant.ids for t in self._moments(d, now) if t > now]
        return min(times, default=now + self.memory_poll_s)

    def _cooled(self, device_id: str, now: float) -> bool:
        return (
            device_id not in self.held
            and now >= self.cooling_since.get(device_id, NEVER) + self.cooldown_s
            and now >= self.memory_blocked_until.get(device_id, NEVER)
        )

    def _moments(self, device_id: str, now: float) -> tuple[float, float, float]:
        return (
            self.cooling_since.get(device_id, NEVER) + self.cooldown_s,
            self.memory_blocked_until.get(device_id, NEVER),
            self._settle_check(device_id, now),
        )

    def _settle_check(self, device_id: str, now: float) -> float:
        """When a settling GPU should be looked at again (its next sample), else -inf."""
        released = self.cooling_since.get(device_id)
        if self.settle is None or released is None:
            return NEVER
        when = self.settle.next_check(device_id, released, now)
        return when if when > now else now + self.settle.spec.sample_s

    # -- changing it ------------------------------------------------------------

    def enqueue(self, request: Request) -> None:
        """A new request joins the back of the queue."""
        self.has_early = self.has_early or request.early
        self.queue.append(request)

    def withdraw(self, request: Request, now: float) -> Step:
        """A request given up before it was served leaves no trace."""
        self.queue.remove(request)
        return self.dispatch(now)

    def dispatch(self, now: float, readings: Mapping[str, Reading] = _NO_READINGS) -> Step:
        """Serve what can be served now: the head first, then bounded backfill.

        `readings` are what the devices said just now (`to_sense`); ids that must
        be sensed and were not are left for a step that has their reading.
        """
        step = Step()
        self.looked_at = now
        self.unread = False
        self._record(readings, now)
        free = self._candidates(now)
        while self.queue and free:
            head = self.queue[0]
            taken = self._take(head.k, free, now, readings, step)
            if taken is None:
                break
            self.queue.popleft()
            self._grant(head, taken, now, readings, step)
        if self.queue and free:
            head = self.queue[0]
            # Walk the queue in place (no copy of it per release): the walk
            # stops as soon as nothing is free or the head may not be jumped.
            backfilled: list[tuple[Request, list[str]]] = []
            for request in itertools.islice(self.queue, 1, None):
                if head.jumps >= self.max_backfill or not free:
                    break
                taken = self._take(request.k, free, now, readings, step)
                if taken is not None:
                    head.jumps += 1
                    backfilled.append((request, taken))
            for request, taken in backfilled:
                self.queue.remove(request)
                self._grant(request, taken, now, readings, step)
        if self.has_early and self.queue:
            self._promise_successors(step)
        self._arm_timer(now, step)
        return step

    def release(self, grant: Grant, now: float, *, work_ended: float | None = None) -> Step:
        """The grant's holder gives its ids back at `now`; their cooldown starts.

        `work_ended` (not after `now`): when the holder's work on them ended, before
        its process exited; the cooldown counts from then, the ids free from `now`.
        """
        if grant.pending:
            return self._abandon(grant, now)
        grant.released = True
        cooldown_from = now if work_ended is None else min(now, work_ended)
        for d in grant.ids:
            del self.held[d]
            self.last_released[d] = now
            self.cooling_since[d] = cooldown_from
            if self.settle is not None:
                self.settle.released(d)
        self.live.remove(grant)
        step = self.dispatch(now)
        if grant.successor is not None:
            step.promises.append(grant.successor)
        return step

    def revoke(self, grant: Grant, now: float) -> Step:
        """A grant never used (its waiter was cancelled): the ids are as before, no cooldown."""
        if grant.pending:
            return self._abandon(grant, now)
        grant.released = True
        for d in grant.ids:
            del self.held[d]
        self.live.remove(grant)
        step = self.dispatch(now)
        if grant.successor is not None:
            step.promises.append(grant.successor)
        return step

    def activate(
        self, grant: Grant, now: float, readings: Mapping[str, Reading] = _NO_READINGS
    ) -> Step:
        """A pending grant's ids become its own, if they are released, cooled and settled.

        The grant stays `pending` when they are not yet.
        """
        self._record(readings, now)
        step = Step()
        first = all(self.promised.get(d) is grant for d in grant.ids)
        ready = (
            first
            and all(self.available(d, now) for d in grant.ids)
            and all(self._memory_ok(d, now, readings, step) for d in grant.ids)
        )
        if not ready:
            return step
        grant.pending = False
        holding = GpuHolding(grant.ids, now)
        for d in grant.ids:
            del self.promised[d]
            self.held[d] = holding
            if grant.successor is not None:  # next in line for them (prestart depth)
                self.promised[d] = grant.successor
        self._hand_on(grant, now)
        self.live.append(grant)
        step.extend(self.dispatch(now))
        return step

    # -- the step's parts -------------------------------------------------------

    def _record(self, readings: Mapping[str, Reading], now: float) -> None:
        if self.settle is not None:
            for device_id, reading in readings.items():
                self.settle.record(device_id, reading.thermal, now)

    def _candidates(self, now: float) -> list[str]:
        # Longest-free first spreads the heat; never-used ids tie, lowest first.
        free = [d for d in self.devices if d not in self.promised and self.available(d, now)]
        free.sort(key=lambda d: (self.cooling_since.get(d, NEVER), self.position[d]))
        return free

    def _take(
        self, k: int, free: list[str], now: float, readings: Mapping[str, Reading], step: Step
    ) -> list[str] | None:
        """Remove and return k usable ids from `free`, or None (leaving it usable)."""
        if k > len(free):
            return None
        chosen: list[str] = []
        for device_id in list(free):
            if not self._memory_ok(device_id, now, readings, step):
                free.remove(device_id)
                continue
            chosen.append(device_id)
            if len(chosen) == k:
                for d in chosen:
                    free.remove(d)
                return chosen
        return None

    def _memory_ok(
        self, device_id: str, now: float, readings: Mapping[str, Reading], step: Step
    ) -> bool:
        if not self.senses:
            return True
        reading = readings.get(device_id)
        if reading is None:
            self.unread = True
            return False
        used = reading.memory_mb
        if self.residual_memory_mb is None or used is None or used <= self.residual_memory_mb:
            self.memory_flagged.discard(device_id)
            return True
        if self.on_busy_memory == "warn":
            step.busy.append(BusyMemory(device_id, used, handed_out=True))
            return True
        self.memory_blocked_until[device_id] = now + self.memory_poll_s
        if device_id not in self.memory_flagged:
            # Once per busy spell, not once per poll.
            self.memory_flagged.add(device_id)
            step.busy.append(BusyMemory(device_id, used, handed_out=False))
        return False

    def _grant(
        self,
        request: Request,
        ids: list[str],
        now: float,
        readings: Mapping[str, Reading],
        step: Step,
    ) -> None:
        ids.sort(key=self.position.__getitem__)
        grant = Grant(tuple(ids))
        self._hand_on(grant, now)
        holding = GpuHolding(grant.ids, now, request.holder)
        for d in ids:
            self.held[d] = holding
        self.live.append(grant)
        request.grant = grant
        request.deadline = NEVER
        step.woken.append(request)

    def _hand_on(self, grant: Grant, now: float) -> None:
        if self.settle is not None:
            grant.settle = {
                d: self.settle.hand_on(d, self.cooling_since.get(d), now) for d in grant.ids
            }

    def _promise_successors(self, step: Step) -> None:
        """Promise running grants' ids to early requests of their size, FIFO, bounded:
        each running grant has at most `depth` promises queued behind it, in a chain.

        A chain is filled to its depth in one step (a depth raised while runs are
        under way takes effect at once, not one promise per later step)."""
        # Each open chain: its tail and how many promises are behind its running grant.
        open_chains: list[tuple[Grant, int]] = []
        for live in self.live:
            tail, behind = live, 0
            while tail.successor is not None:
                tail, behind = tail.successor, behind + 1
            if behind < self.depth:
                open_chains.append((tail, behind))
        head: Request | None = self.queue[0]
        promised: list[Request] = []
        for request in self.queue:
            if head is None:
                head = request  # the oldest not yet served: the one others may jump
            jumping = request is not head
            if not open_chains or (jumping and head.jumps >= self.max_backfill):
                break
            if not request.early:
                continue
            at = next((i for i, (g, _) in enumerate(open_chains) if len(g.ids) == request.k), None)
            if at is None:
                continue
            predecessor, behind = open_chains.pop(at)
            if jumping:
                head.jumps += 1
            else:
                head = None  # served in its turn: the next one waiting is the oldest
            grant = Grant(predecessor.ids, pending=True)
            predecessor.successor = grant
            for d in grant.ids:
                self.promised.setdefault(d, grant)  # the first pending one is next in line
            request.grant = grant
            request.deadline = NEVER
            promised.append(request)
            if behind + 1 < self.depth:
                open_chains.append((grant, behind + 1))
        for request in promised:
            self.queue.remove(request)
            step.woken.append(request)

    def _abandon(self, grant: Grant, now: float) -> Step:
        """A promise given up before it was ready: its ids are as they were, no cooldown."""
        grant.pending = False
        grant.released = True
        after = grant.successor
        for d in grant.ids:
            if self.promised.get(d) is grant:
                del self.promised[d]
                if after is not None:
                    self.promised[d] = after
        for live in self.live:
            before = live
            while before.successor is not None and before.successor is not grant:
                before = before.successor
            if before.successor is grant:
                before.successor = after  # the chain closes up behind it
        step = self.dispatch(now)
        step.promises.append(grant)
        if after is not None:
            step.promises.append(after)
        return step

    def _arm_timer(self, now: float, step: Step) -> None:
        """Make sure the head wakes by the next cooldown end, re-check or needed reading.

        The head may be new (the one before it was served or gave up, and it went
        to sleep with no deadline), a release may have started a cooldown that
        ends before the head's deadline, or ids wait to be sensed: either way it
        is woken to look again. Without such a moment due, nothing needs a timer.
        """
        if self.queue:
            head = self.queue[0]
            due = -math.inf if self.unread else self.next_deadline(now)
            if due < head.deadline:
                head.deadline = NEVER
                step.woken.append(head)
