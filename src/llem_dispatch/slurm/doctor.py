"""`doctor`'s Slurm lines: Slurm answers, its partitions and GPUs, the shared filesystem."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from llem_dispatch.errors import LlemError
from llem_dispatch.runners.kinds import DoctorCheck
from llem_dispatch.slurm import commands

__all__ = ["SlurmProbe", "doctor_checks"]


class SlurmProbe(Protocol):
    """What the checks ask of a Slurm placement built on a scratch results dir."""

    allocation: str | None

    @property
    def gpus(self) -> tuple[int, int | None]:
        """GPUs in the partition, and on its largest node."""

    async def survey(self) -> None:
        """Ask Slurm for the partition's nodes and GPUs."""

    async def check_shared(self) -> None:
        """A job writes a marker into the results dir; raise if it cannot be seen."""

    async def aclose(self) -> None:
        """Cancel whatever is left."""


async def doctor_checks(probe: Callable[[Path], SlurmProbe], folder: Path) -> list[DoctorCheck]:
    """Slurm answers; its partitions and their GPUs; a job can write into `folder`."""
    try:
        found = await commands.partitions()
    except LlemError as exc:
        return [DoctorCheck("Slurm", False, exc.message, exc.fix_suggestion)]
    listing = ", ".join(
        f"{p.name}{'*' if p.default else ''} ({p.nodes} node(s), {p.state}, "
        f"{commands.gpu_count(p.gres)} GPU(s) per node)"
        for p in found
    )
    checks = [DoctorCheck("Slurm", True, f"answers; partitions: {listing or 'none'}")]
    with tempfile.TemporaryDirectory(prefix=".llem-doctor-", dir=folder) as scratch:
        placement = probe(Path(scratch))
        try:
            await placement.survey()
            total, largest = placement.gpus
            checks.append(
                DoctorCheck(
                    "Slurm GPUs",
                    total > 0,
                    f"{total} in the partition, at most {largest} on one node",
                    "" if total else "Name a GPU partition in `slurm: {partition: ...}`.",
                    optional=True,
                )
            )
            await placement.check_shared()
            checks.append(DoctorCheck("shared filesystem", True, f"a job wrote into {folder}"))
        except LlemError as exc:
            checks.append(DoctorCheck("Slurm job", False, exc.message, exc.fix_suggestion))
        finally:
            await placement.aclose()
    if placement.allocation:
        checks.append(
            DoctorCheck(
                "Slurm allocation",
                True,
                f"inside job {placement.allocation}: experiments run as its job steps",
            )
        )
    return checks
