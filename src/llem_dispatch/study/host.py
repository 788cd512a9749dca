"""The study file's host-side scheduling: prestart, its depth, quiet windows and cores.

A base of `schema.Study` (its fields are the study's own, written at the top level).
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from llem_dispatch.dispatch.quiet import Policy
from llem_dispatch.study.sections import SizeText

__all__ = ["HostSchedule"]


class HostSchedule(BaseModel):
    """How experiments share this host: prestart, preparation depth, quiet windows, cores."""

    prestart: bool = Field(
        default=False,
        description="Warm hand-off (local GPUs): start the next experiment's container "
        "while its GPUs are still busy and hold it at a gate (LLEM_GO_PATH; a `command:` "
        "behind a /bin/sh gate) until they are free and cooled down; its CPU start-up "
        "(and a generator's prepare part) runs beside the current experiment. Its "
        "timeout counts from the gate. Off by default.",
    )
    prestart_memory_reserve: SizeText | None = Field(
        default=None,
        description='Host memory prestarts must leave available ("32g"; null: 20% of it): '
        "below it, a run is not started early (nor prepared) but waits for its GPUs.",
    )
    prestart_depth: int | Literal["auto"] = Field(
        default="auto",
        description="How many experiments per GPU may be prestarted ahead of the running "
        "one (1: the next only); `auto` starts at 1 and goes as deep as the measured "
        "preparations need (each finished run's preparation against its hold of the GPU, "
        "with a 25% margin; one deeper when a prestarted run is still preparing at its "
        "gate), up to 4. The memory reserve bounds it.",
    )
    prepare_during_measurement: Policy = Field(
        default="pause",
        description="What runs preparing beside a measured window do: `pause` (frozen, "
        "SIGSTOP or the engine's pause, from the window's `quiet` mark to its `done`) or "
        "`run` (not paused; records count the overlap).",
    )
    cpus_per_gpu: int | None = Field(
        default=None,
        ge=1,
        description="Host cores each GPU's experiments measure on (preparing runs get the "
        "rest, at low priority); null: the cores NVML names nearest each GPU, shared out, "
        "on real GPUs, and no pinning on virtual ones.",
    )

    @field_validator("cpus_per_gpu")
    @classmethod
    def _cpus_ok(cls, value: int | None) -> int | None:
        have = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if value is not None and have and value > have:
            raise ValueError(
                f"{value} cores per GPU, but this host gives us {have}: at most {have}"
            )
        return value
