"""A placement that runs each attempt in a worker of a process pool (`placement: procpool`).

Written from the README as an outsider would: one module, one entry point
(`llem_dispatch.placements`), public names only. Its settings block is
`procpool: {workers: 2}`, validated at load by `ProcessPoolSettings` (each
problem at its line). GPUs are this host's (the study's `gpus:`/`virtual_gpus:`),
leased here and handed to the worker, which builds the study's runner from its
(pickled) factory and runs the one config.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field

from llem_dispatch import Placement, PlacementRequest
from llem_dispatch.dispatch import HostRunnerFactory, RecordDraft, ThisHost
from llem_dispatch.errors import ConfigError
from llem_dispatch.gpu import GpuPool
from llem_dispatch.models import HashedConfig
from llem_dispatch.runners.protocol import Outcome, utcnow

__all__ = ["ProcessPoolPlacement", "ProcessPoolSettings"]


class ProcessPoolSettings(BaseModel):
    """The study's `procpool:` block."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(default=2, ge=1, le=64, description="Worker processes.")
    start_method: Literal["spawn", "forkserver"] = Field(
        default="spawn", description="How workers start (never fork: the driver has threads)."
    )


def _run_in_worker(
    factory: bytes, config: dict[str, Any], gpus: list[str], virtual: bool
) -> tuple[int, Outcome]:
    """In a worker: build the study's runner, run one config, close the runner."""
    runner_factory: HostRunnerFactory = pickle.loads(factory)  # noqa: S301 - our own pickle

    async def main() -> Outcome:
        runner = runner_factory(ThisHost(virtual=virtual))
        try:
            return await runner.run(config, gpus=gpus)
        finally:
            await runner.aclose()

    return os.getpid(), anyio.run(main)


class ProcessPoolPlacement(Placement):
    """Each attempt in a worker process of a pool, on GPUs leased from this host's pool."""

    settings_model: ClassVar[type[BaseModel] | None] = ProcessPoolSettings

    def __init__(
        self,
        factory: HostRunnerFactory,
        pool: GpuPool,
        settings: ProcessPoolSettings,
        runner_type: str,
    ) -> None:
        try:
            self._factory = pickle.dumps(factory)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise ConfigError(
                f"the runner cannot be sent to worker processes: {exc}",
                fix_suggestion="Choose the runner by kind (runner: local) rather than "
                "handing in one built here.",
            ) from exc
        self.pool = pool
        self.settings = settings
        self.runner_type = runner_type
        context = multiprocessing.get_context(settings.start_method)
        self._executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=settings.workers, mp_context=context
        )
        #: The workers that ran an attempt.
        self.workers_used: set[int] = set()

    @classmethod
    def for_study(
        cls, request: PlacementRequest, settings: BaseModel | None
    ) -> ProcessPoolPlacement:
        """The study's GPUs (or `request.pool`), its runner factory, its `procpool:` block."""
        assert isinstance(settings, ProcessPoolSettings)  # validated at load, by its model
        pool = request.pool or request.host_gpus.pool(cooldown_s=request.cooldown_s)
        pool.check_request(request.max_gpu_count)
        return cls(request.runner_factory, pool, settings, request.runner_kind)

    def check_request(self, gpus: int) -> None:
        """More GPUs than the pool has is an error now."""
        self.pool.check_request(gpus)

    def parallelism(self) -> int:
        """One attempt per worker: none waits inside the executor."""
        return self.settings.workers

    def describe(self) -> Mapping[str, Any]:
        """The workers and the GPUs."""
        return {"procpool": {"workers": self.settings.workers, "gpus": list(self.pool.devices)}}

    async def attempt(
        self,
        config: HashedConfig,
        gpus: int,
        draft: RecordDraft,
        on_started: Callable[[], None],
    ) -> Outcome:
        """Lease the GPUs here, run the config in a worker on them."""
        async with self.pool.acquire(gpus) as lease:
            draft.gpu_ids = list(lease)
            future = self._executor.submit(
                _run_in_worker,
                self._factory,
                dict(config),
                list(self.pool.handed(lease)),
                self.pool.virtual,
            )
            draft.started_at = utcnow()
            on_started()
            try:
                pid, outcome = await anyio.to_thread.run_sync(future.result, abandon_on_cancel=True)
            except anyio.get_cancelled_exc_class():
                future.cancel()
                raise
            draft.exited_at = utcnow()
            self.workers_used.add(pid)
            return outcome

    async def aclose(self) -> None:
        """Stop the workers (idempotent)."""
        await anyio.to_thread.run_sync(lambda: self._executor.shutdown(cancel_futures=True))
