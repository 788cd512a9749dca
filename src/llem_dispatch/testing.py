"""Test doubles shipped with the library: a FakeRunner for scheduler tests and benchmarks.

`FakeRunner(handler)` implements the Runner protocol in-process, so a
Dispatcher or study can be exercised in microseconds without Docker.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from llem_dispatch.models import (
    ExperimentFailure,
    ExperimentResult,
    RunnerMetadata,
    compute_config_hash,
    config_to_dict,
)
from llem_dispatch.runners.protocol import Outcome, RunInfo, RunObserver, utcnow

__all__ = ["FakeRunner", "Handler"]

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
