"""A Slurm cluster: attempts as Slurm jobs (or job steps inside an allocation).

Exports lazily: a job's entry (`llem_dispatch.slurm.job`) and the study schema
(`slurm.settings`) do not import the placement.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["SlurmPlacement", "SlurmSettings"]

_HOMES = {"SlurmPlacement": "placement", "SlurmSettings": "settings"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'llem_dispatch.slurm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llem_dispatch.slurm.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from llem_dispatch.slurm.placement import SlurmPlacement
    from llem_dispatch.slurm.settings import SlurmSettings
