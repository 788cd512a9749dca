"""Adaptive cycles without a barrier: each config decides alone, as its own cycles end.

Pure: `CycleChains` knows, per config, which cycles are requested and which are on
record (the `CycleHistory`), and says what to request next. A config decides on
all of its cycles on record as soon as none of its own is in flight; no config
waits for another's. With `speculate`, it also asks for its next cycle while the
current one runs, so that it can be prepared and prestarted: a speculative cycle is
never dropped, it runs and counts as one more cycle (never beyond `max`), and the
config decides again on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llem_dispatch.study.adaptive import CycleHistory, Decision, Unresolved
from llem_dispatch.study.sections import CycleSpec

__all__ = ["ChainStep", "CycleChains"]


@dataclass(frozen=True, slots=True)
class ChainStep:
    """What one config does now: its decision (if it took one) and the cycles to request."""

    config_hash: str
    cycles_run: int
    decision: Decision | None = None
    request: tuple[int, ...] = ()
    speculative: bool = False


@dataclass
class CycleChains:
    """Per config: the cycles requested, its final decision once it has one."""

    history: CycleHistory
    spec: CycleSpec
    configs: dict[str, dict[str, Any]]
    requested: dict[str, set[int]] = field(default_factory=dict)
    #: Its last decision that was not `more`, and on how many cycles it was taken.
    final: dict[str, tuple[int, Decision]] = field(default_factory=dict)

    @classmethod
    def start(
        cls, history: CycleHistory, spec: CycleSpec, configs: Iterable[tuple[str, dict[str, Any]]]
    ) -> CycleChains:
        """Every config with its `min` cycles requested, and those on record (resume)."""
        chains = cls(history, spec, dict(configs))
        for config_hash in chains.configs:
            on_record = history.cycles(config_hash)
            chains.requested[config_hash] = set(range(1, spec.min + 1)) | on_record
        return chains

    def in_flight(self, config_hash: str) -> set[int]:
        """Its cycles requested and not yet on record."""
        return self.requested[config_hash] - self.history.cycles(config_hash)

    def step(self, config_hash: str, *, speculate: bool = False) -> ChainStep:
        """What `config_hash` does now (after one of its records, or at the start)."""
        requested = self.requested[config_hash]
        top = max(requested)
        running = self.in_flight(config_hash)
        if not running and self.final.get(config_hash, (None,))[0] == top:
            return ChainStep(config_hash, top)  # decided on these cycles already
        if running:
            # Its next cycle while this one runs, so that it can be prepared beside it.
            ahead = top + 1
            likely = config_hash not in self.final and self.spec.min <= top < self.spec.max
            if speculate and running == {top} and likely:
                requested.add(ahead)
                return ChainStep(config_hash, top, request=(ahead,), speculative=True)
            return ChainStep(config_hash, top)
        decision = self.history.decide(config_hash, top + 1, self.spec)
        if decision.verdict != "more":
            # Final unless a speculative cycle lands after all: then it decides again.
            self.final[config_hash] = (top, decision)
            return ChainStep(config_hash, top, decision)
        self.final.pop(config_hash, None)
        requested.add(top + 1)
        return ChainStep(config_hash, top, decision, request=(top + 1,))

    def unresolved(self) -> list[Unresolved]:
        """The configs whose final decision is `unresolved`, in study order."""
        return [
            Unresolved.of(h, dict(c), max(self.requested[h]), self.spec.until.field, d)
            for h, c in self.configs.items()
            if (d := self.final.get(h, (0, None))[1]) is not None and d.verdict == "unresolved"
        ]
