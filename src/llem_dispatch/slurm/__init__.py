"""A Slurm cluster: attempts as Slurm jobs (or job steps inside an allocation)."""

from llem_dispatch.slurm.placement import SlurmPlacement
from llem_dispatch.slurm.settings import SlurmSettings

__all__ = ["SlurmPlacement", "SlurmSettings"]
