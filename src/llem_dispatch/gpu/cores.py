"""Which host cores each GPU's experiments measure on, and which are left for preparing.

Pure: `plan_cores` splits the host's cores into one fixed slot per GPU (the cores
nearest it, NVML's CPU affinity, where known) and the spare rest; an experiment on
GPUs g1, g2 measures on the union of their slots (GPUs are never shared, so slots
never are), and runs preparing beside it use the spare cores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from llem_dispatch.errors import ConfigError

__all__ = ["CorePlan", "plan_cores"]


@dataclass(frozen=True, slots=True)
class CorePlan:
    """One slot of cores per GPU, and the spare cores (for preparing runs)."""

    slots: Mapping[str, tuple[int, ...]]
    spare: tuple[int, ...]
    host: tuple[int, ...]

    def measuring(self, gpus: Sequence[str]) -> tuple[int, ...]:
        """The cores an experiment on `gpus` measures on (empty: it is not pinned)."""
        return tuple(sorted({c for g in gpus for c in self.slots.get(g, ())}))

    def preparing(self) -> tuple[int, ...]:
        """The cores a run preparing beside the measured ones uses: the spare, else all."""
        return self.spare or self.host


def plan_cores(
    host: Sequence[int],
    gpus: Sequence[str],
    *,
    per_gpu: int | None = None,
    affinity: Mapping[str, Sequence[int]] | None = None,
    keep_spare: bool = True,
) -> CorePlan:
    """Split `host`'s cores among `gpus`: `per_gpu` each, or an even share of their group.

    GPUs with the same `affinity` (the cores nearest them) form a group that shares
    those cores; without `per_gpu` each gets an equal share of its group's cores,
    one share kept back for preparing runs when `keep_spare`. A GPU whose nearest
    cores are taken gets others. `per_gpu` beyond what the host has is a `ConfigError`.
    """
    host_cores = tuple(sorted(set(host)))
    if per_gpu is not None and per_gpu * len(gpus) > len(host_cores):
        raise ConfigError(
            f"cpus_per_gpu: {per_gpu} cores for each of {len(gpus)} GPUs is "
            f"{per_gpu * len(gpus)}, but this host has {len(host_cores)} for us",
            fix_suggestion=f"Set `cpus_per_gpu` to at most {len(host_cores) // max(1, len(gpus))}"
            " or use fewer GPUs.",
        )
    groups: dict[tuple[int, ...], list[str]] = {}
    for gpu in gpus:
        near = tuple(sorted(set((affinity or {}).get(gpu, host_cores)) & set(host_cores)))
        groups.setdefault(near or host_cores, []).append(gpu)
    taken: set[int] = set()
    slots: dict[str, tuple[int, ...]] = {}
    for near, members in groups.items():
        share = per_gpu
        if share is None:
            share = max(1, len(near) // (len(members) + (1 if keep_spare else 0)))
        for gpu in members:
            free = [c for c in near if c not in taken]
            free += [c for c in host_cores if c not in taken and c not in near]
            slot = tuple(free[:share])
            taken.update(slot)
            slots[gpu] = slot
    spare = tuple(c for c in host_cores if c not in taken)
    return CorePlan(slots=slots, spare=spare, host=host_cores)
