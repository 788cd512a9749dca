"""The prestart hand-off on a clock the test controls (trio's MockClock): the gate opens
in the scheduler step of the release when the cooldown has run out since `done`, and
the hand-off gap counts from the exit, whatever the cooldown counts from.

Time only moves when every task sleeps, so a gap of exactly 0 means no timer was
waited for between the previous run's exit and the next one's gate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import anyio
import pytest
from pydantic import BaseModel
from trio.testing import MockClock

from llem_dispatch.dispatch import Dispatcher, RunRecord
from llem_dispatch.gpu import GpuPool
from llem_dispatch.models import ExperimentResult, RunnerMetadata, compute_config_hash
from llem_dispatch.runners.protocol import Outcome, PhaseTimes, RunInfo, RunObserver, utcnow

#: Mock seconds each run works, then spends exiting after its `done` mark.
WORK_S = 30.0
TEARDOWN_S = 5.0


class GatedFake:
    """A gated runner that works WORK_S, marks `done`, and exits TEARDOWN_S later."""

    runner_type = "fake"
    speaks_gate = True

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Sequence[str] | None = None,
        observer: RunObserver | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> Outcome:
        assert isinstance(config, Mapping)
        config_hash = compute_config_hash(dict(config))
        info = RunInfo(config_hash, tuple(gpus or ()), "", "", self.runner_type)
        if gate is not None:
            await gate()
        info.started_at = utcnow()
        assert observer is not None
        observer.on_started(info)
        await anyio.sleep(WORK_S)
        await anyio.sleep(TEARDOWN_S)
        # The `done` mark is wall-clock: TEARDOWN_S before this (mock) exit.
        info.phases = PhaseTimes(work_ended_at=utcnow() - timedelta(seconds=TEARDOWN_S))
        info.exited_at = utcnow()
        observer.on_exited(info)
        return ExperimentResult(
            config_hash=config_hash,
            data={},
            runner=RunnerMetadata(runner_type=self.runner_type, gpu_ids=list(info.gpu_ids)),
        )

    async def aclose(self) -> None:
        return


def hand_offs(cooldown_s: float) -> list[RunRecord]:
    """Three runs on one virtual GPU with prestart; their records in order."""

    async def main() -> list[RunRecord]:
        pool = GpuPool.virtual_devices(1, cooldown_s=cooldown_s)
        configs = [{"i": i} for i in range(3)]
        async with Dispatcher(GatedFake(), pool=pool, prestart=True) as dispatcher:
            records = [r async for r in dispatcher.map(configs, gpus=1)]
        return sorted(records, key=lambda r: r.started_at or r.queued_at)

    result: list[RunRecord] = anyio.run(
        main, backend="trio", backend_options={"clock": MockClock(autojump_threshold=0)}
    )
    return result


@pytest.mark.parametrize("cooldown_s", [0.0, 2.0])
def test_the_gate_opens_at_the_release_when_the_cooldown_ran_out_since_done(
    cooldown_s: float,
) -> None:
    records = hand_offs(cooldown_s)
    assert all(r.ok for r in records)
    later = records[1:]
    assert all(r.prestarted for r in later)
    # From the exit (not the `done` mark TEARDOWN_S before it), and no timer between.
    assert [r.handoff_gap_s for r in later] == [0.0, 0.0]


def test_a_cooldown_longer_than_the_teardown_ends_its_length_after_done() -> None:
    cooldown_s = TEARDOWN_S + 3.0
    records = hand_offs(cooldown_s)
    # The gate opens cooldown_s after `done`: 3 s after the exit, never before it.
    for record in records[1:]:
        assert record.prestarted
        assert record.handoff_gap_s == pytest.approx(cooldown_s - TEARDOWN_S, abs=0.05)
