"""What each Slurm job of a study asks for and runs: its options, time limit, command, spec.

Plain values from the study and its `slurm:` block; no Slurm call is made here.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llem_dispatch.gpu import SettleSpec
from llem_dispatch.gpu.attempt_telemetry import NodeTelemetry
from llem_dispatch.models import HashedConfig
from llem_dispatch.slurm.commands import time_s
from llem_dispatch.slurm.settings import SlurmSettings

__all__ = ["MARGIN_S", "JobTemplate"]

#: Beyond the experiment's own timeout: the job's Python start, the cooldown and
#: the thermal gate, and the runner's clean-up.
MARGIN_S = 120.0


@dataclass(frozen=True, slots=True)
class JobTemplate:
    """The parts every job (or job step) of one study shares."""

    settings: SlurmSettings
    study_name: str
    #: The pickled runner factory each job builds its runner from.
    factory_path: Path
    cooldown_s: float = 0.0
    settle: SettleSpec | None = None
    timeout_s: float | None = None
    #: The study's cores per GPU: each job asks for them and its step is bound to them.
    cpus_per_gpu: int | None = None
    #: GPU telemetry each job samples of its GPUs (the samples come back in its outcome).
    telemetry: NodeTelemetry | None = None

    def _after_work_s(self) -> float:
        """What a job does beyond the experiment's own timeout: the cooldown and the gate."""
        settle = self.settle.max_s if self.settle is not None else 0.0
        return self.cooldown_s + settle

    def own_bound_s(self) -> float | None:
        """How long a started job may run before we cancel it ourselves."""
        limit = time_s(self.settings.time_limit) if self.settings.time_limit else None
        if self.timeout_s is None and limit is None:
            return None
        ours = self.timeout_s + self._after_work_s() if self.timeout_s else math.inf
        return min(ours, limit or math.inf) + MARGIN_S

    def time_limit(self) -> str | None:
        """The `--time` of each job: the setting, else the study's timeout plus margins."""
        if self.settings.time_limit:
            return self.settings.time_limit
        if self.timeout_s is None:
            return None
        return str(math.ceil((self.timeout_s + self._after_work_s() + MARGIN_S) / 60))

    def job_name(self, config: HashedConfig) -> str:
        """The study's name and the config's hash: what `squeue` shows."""
        return f"llem-{self.study_name}-{config.config_hash[:8]}"

    def spec(self, config: HashedConfig) -> dict[str, Any]:
        """What the job reads from its attempt dir (`slurm.job`)."""
        return {
            "config": dict(config),
            "config_hash": config.config_hash,
            "factory": str(self.factory_path),
            "cooldown_s": self.cooldown_s,
            "settle": self.settle.model_dump() if self.settle is not None else None,
            "telemetry": self.telemetry.to_wire() if self.telemetry is not None else None,
            "driver_host": socket.gethostname(),
        }

    def command(self, folder: Path) -> list[str]:
        """What the job runs: the entry of this package, with the driver's Python."""
        python = self.settings.python or sys.executable
        argv = [python, "-m", "llem_dispatch.slurm.job", str(folder)]
        path = os.environ.get("PYTHONPATH")
        if path:
            # The job starts in its attempt dir: a relative entry must name what it
            # names here (e.g. a source checkout's `src`).
            entries = [str(Path(p).resolve()) if p else p for p in path.split(os.pathsep)]
            argv = ["env", f"PYTHONPATH={os.pathsep.join(entries)}", *argv]
        return argv

    def sbatch_options(self, gpus: int, name: str, *, step: bool = False) -> list[str]:
        """The options every job of this study gets (a step: those within an allocation)."""
        s = self.settings
        argv = [f"--job-name={name}"]
        if gpus:
            argv.append(f"--gpus={gpus}" if s.gpu_option == "gpus" else f"--gres=gpu:{gpus}")
        # A step lives in the allocation's partition, account and QOS.
        where = (
            ()
            if step
            else (
                ("--partition", s.partition),
                ("--account", s.account),
                ("--qos", s.qos),
                ("--constraint", s.constraint),
            )
        )
        cpus = s.cpus_per_task
        if cpus is None and self.cpus_per_gpu is not None and gpus:
            # The study's cores per GPU, for the job's GPUs (`slurm.cpus_per_task` wins).
            cpus = self.cpus_per_gpu * gpus
        for flag, value in (
            *where,
            ("--time", self.time_limit()),
            ("--cpus-per-task", cpus),
            ("--mem", s.mem),
        ):
            if value is not None:
                argv.append(f"{flag}={value}")
        if step and cpus is not None:
            argv.append("--cpu-bind=cores")  # the step's task on its own cores
        if not step:
            # Slurm would requeue a job whose node failed and run it again unseen: our
            # retry policy decides instead, so each retry is journalled and bounded.
            argv.append("--no-requeue")
        return [*argv, *s.sbatch_args]
