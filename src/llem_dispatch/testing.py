"""Test doubles shipped with the library: a FakeRunner for scheduler tests and benchmarks,
and a telemetry reader of known power for machines without NVML.

`FakeRunner(handler)` implements the Runner protocol in-process, so a
Dispatcher or study can be exercised in microseconds without Docker.
`constant_power_reader` is what the test switch `LLEM_TELEMETRY_READER` names
(`llem_dispatch.testing:constant_power_reader`) to sample every placement in CI.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from llem_dispatch.gpu.telemetry import Sample
from llem_dispatch.models import (
    ExperimentFailure,
    ExperimentResult,
    RunnerMetadata,
    compute_config_hash,
    config_to_dict,
)
from llem_dispatch.runners.protocol import Outcome, RunInfo, RunObserver, utcnow

__all__ = ["ConstantPowerReader", "FakeRunner", "Handler", "constant_power_reader"]

Handler = Callable[[dict[str, Any], tuple[str, ...]], Any]


class FakeRunner:
    """A Runner that calls `handler(config, gpu_ids)` instead of starting anything.

    The handler (sync or async) returns a result dict, an `ExperimentFailure`, or
    raises (e.g. `ExperimentTimeoutError`, or a Docker class) to simulate
    infrastructure failures.
    Observers see started/exited exactly as with real runners.
    """

    runner_type = "fake"

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler: Handler = handler or (lambda config, gpus: {"ok": True})
        self.calls: list[tuple[dict[str, Any], tuple[str, ...]]] = []
        self.closed = False

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Sequence[str] | None = None,
        observer: RunObserver | None = None,
    ) -> Outcome:
        data = config_to_dict(config)
        config_hash = compute_config_hash(data)
        gpu_ids = tuple(gpus or ())
        self.calls.append((data, gpu_ids))
        info = RunInfo(
            config_hash=config_hash,
            gpu_ids=gpu_ids,
            exchange_dir="",
            log_path="",
            runner_type=self.runner_type,
            started_at=utcnow(),
        )
        if observer is not None:
            observer.on_started(info)
        try:
            value = self.handler(data, gpu_ids)
            if inspect.isawaitable(value):
                value = await value
        finally:
            info.exited_at = utcnow()
            if observer is not None:
                observer.on_exited(info)
        if isinstance(value, ExperimentFailure):
            return value
        return ExperimentResult(
            config_hash=config_hash,
            data=dict(value),
            runner=RunnerMetadata(runner_type=self.runner_type, gpu_ids=list(gpu_ids)),
        )

    async def aclose(self) -> None:
        self.closed = True


class ConstantPowerReader:
    """A telemetry reader whose GPUs each draw `watts`, always: energy over any window is
    `watts` x its seconds. The energy counter is `watts` x epoch seconds, so readers in
    different processes (a driver, Ray nodes, Slurm jobs) agree."""

    def __init__(self, gpus: Sequence[str], watts: float = 100.0) -> None:
        self.gpus = tuple(gpus)
        self.watts = watts

    def read(self, detail: bool) -> list[Sample]:
        """One sample per GPU, now."""
        t = time.time()
        extra = {"temperature_c": 40.0, "sm_util_pct": 50.0} if detail else {}
        return [
            Sample(t=t, gpu=g, power_w=self.watts, energy_j=self.watts * t, **extra)
            for g in self.gpus
        ]


def constant_power_reader(gpus: Sequence[str]) -> ConstantPowerReader:
    """100 W per GPU: what the test switch names as
    `LLEM_TELEMETRY_READER=llem_dispatch.testing:constant_power_reader`."""
    return ConstantPowerReader(gpus)
