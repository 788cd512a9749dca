"""The Slurm placement's settings: the study file's `slurm:` block, checked at load.

Plain pydantic, no Slurm: the study schema imports it to validate the block (and
name each problem's line) without running any Slurm command.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["SlurmSettings"]

# Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME_RE = re.compile(r"^(?:\d+-)?\d+(?::\d+){0,2}$|^UNLIMITED$|^INFINITE$")
#: What `sbatch` decides itself from these settings: giving them again in
#: `sbatch_args` would make the two disagree.
_OURS = (
    "--job-name",
    "-J",
    "--gpus",
    "-G",
    "--gres",
    "--time",
    "-t",
    "--output",
    "-o",
    "--parsable",
)


class SlurmSettings(BaseModel):
    """Where and how a study runs on a Slurm cluster (`placement: slurm`, `slurm: {...}`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    partition: str | None = Field(default=None, min_length=1, description="`--partition`.")
    account: str | None = Field(default=None, min_length=1, description="`--account`.")
    qos: str | None = Field(default=None, min_length=1, description="`--qos`.")
    constraint: str | None = Field(
        default=None, min_length=1, description="`--constraint` (node features, e.g. a100)."
    )
    time_limit: str | None = Field(
        default=None,
        description="Each job's `--time` (Slurm's format: MM, HH:MM:SS, D-HH:MM). Default: "
        "the study's timeout_s plus a margin, rounded up to minutes; none if it has none.",
    )
    gpu_option: str = Field(
        default="gpus",
        pattern=r"^(gpus|gres)$",
        description="How a job asks for its GPUs: gpus (`--gpus=N`) or gres (`--gres=gpu:N`).",
    )
    cpus_per_task: int | None = Field(default=None, gt=0, description="`--cpus-per-task`.")
    mem: str | None = Field(default=None, min_length=1, description="`--mem` (e.g. 64G).")
    sbatch_args: list[str] = Field(
        default_factory=list,
        description="Further `sbatch`/`srun` arguments, as a list (e.g. [--exclusive]).",
    )
    max_queued: int = Field(
        default=64,
        gt=0,
        description="How many of the study's jobs may wait in the queue at once.",
    )
    poll_interval_s: float = Field(
        default=1.0, gt=0, description="Seconds between `squeue` calls while jobs change."
    )
    max_poll_interval_s: float = Field(
        default=10.0,
        gt=0,
        description="The longest gap between `squeue` calls (reached by back-off when "
        "nothing changes).",
    )
    file_poll_interval_s: float = Field(
        default=0.1,
        gt=0,
        description="Seconds between looks (a `stat`) at each waited-for job's "
        "started.json and outcome.json in the results dir: a job that wrote its result "
        "is taken this soon; `squeue` still finds a job that ended without writing.",
    )
    cancel_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="How long cancelled jobs may take to leave the queue before we stop "
        "waiting for them.",
    )
    check_shared_fs: bool = Field(
        default=True,
        description="Before the study, run one small job that writes into the results dir, "
        "and stop with a clear error if the driver cannot see the file.",
    )
    shared_fs_timeout_s: float = Field(
        default=300.0, gt=0, description="How long that check waits for its job."
    )
    python: str | None = Field(
        default=None,
        min_length=1,
        description="The Python that runs each job on the nodes (default: the driver's own, "
        "which must be on the shared filesystem too).",
    )

    @field_validator("time_limit")
    @classmethod
    def _time_ok(cls, value: str | None) -> str | None:
        if value is not None and not _TIME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a Slurm time: use MM, HH:MM:SS or D-HH:MM:SS (e.g. 2:00:00)"
            )
        return value

    @field_validator("sbatch_args")
    @classmethod
    def _args_ok(cls, value: list[str]) -> list[str]:
        for arg in value:
            name = arg.split("=", 1)[0]
            if name in _OURS:
                raise ValueError(
                    f"sbatch_args must not set {name}: llem-dispatch sets it per job "
                    "(use time_limit, gpu_option, ...)"
                )
        return value
