"""RoutingRunner: one runner per backend, chosen by a field of each config."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from llem_dispatch.errors import ConfigError
from llem_dispatch.runners.protocol import (
    GatedRunner,
    GpuCheckingRunner,
    Outcome,
    Runner,
    RunObserver,
)

__all__ = ["RoutingRunner"]


class RoutingRunner:
    """Sends each config to the runner of its backend (one image per backend)."""

    def __init__(self, field_name: str, runners: Mapping[str, Runner]) -> None:
        self.field_name = field_name
        self.runners = dict(runners)
        #: The backends' kind (one kind for all of them: docker, podman).
        self.runner_type = next((r.runner_type for r in self.runners.values()), "docker")

    async def check_gpus(self, gpus: Sequence[str]) -> None:
        """Each backend's runner checks that it can hand over `gpus`."""
        for runner in self.runners.values():
            if isinstance(runner, GpuCheckingRunner):
                await runner.check_gpus(gpus)

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Any = None,
        observer: RunObserver | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> Outcome:
        data = config.model_dump() if isinstance(config, BaseModel) else dict(config)
        backend = str(data.get(self.field_name))
        runner = self.runners.get(backend)
        if runner is None:
            raise ConfigError(
                f"config has {self.field_name}={backend!r}, which has no image",
                fix_suggestion=f"Add images.{backend} to the study or set "
                f"LLEM_IMAGE_{backend.upper()}.",
            )
        if gate is None:
            return await runner.run(config, gpus=gpus, observer=observer)
        if not isinstance(runner, GatedRunner):
            raise TypeError(f"the runner for {backend!r} cannot hold a run at a gate")
        return await runner.run(config, gpus=gpus, observer=observer, gate=gate)

    @property
    def speaks_gate(self) -> bool:
        """Whether every backend's runner can hold its runs at a gate."""
        return bool(self.runners) and all(
            isinstance(r, GatedRunner) and r.speaks_gate for r in self.runners.values()
        )

    async def aclose(self) -> None:
        for runner in self.runners.values():
            await runner.aclose()
