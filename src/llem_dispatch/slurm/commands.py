"""The Slurm edge: `sbatch`, `squeue`, `scontrol`, `scancel`, `sinfo`, each bounded.

Slurm's command-line tools are its stable interface (its REST API is optional
and often off); each call here has its own deadline, its output parsed into
plain values, and its failures mapped to our errors once, here.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import anyio

from llem_dispatch.errors import ClusterError, EngineUnavailableError

__all__ = [
    "ACTIVE_STATES",
    "NEVER_STARTS",
    "JobState",
    "Partition",
    "gpu_count",
    "in_allocation",
    "partitions",
    "sbatch",
    "scancel",
    "slurm_call",
    "squeue_states",
    "study_jobs",
    "time_s",
]

#: States of a job that has not ended yet (it holds or waits for its resources).
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)

#: Reasons a job stays pending that no wait will clear (Slurm's `squeue %r`).
NEVER_STARTS = frozenset(
    {
        "PartitionTimeLimit",
        "PartitionNodeLimit",
        "PartitionConfig",
        "BadConstraints",
        "InvalidAccount",
        "InvalidQOS",
        "QOSMaxWallDurationPerJobLimit",
        "AssocMaxWallDurationPerJobLimit",
        "QOSMaxGRESPerJob",
        "AssocMaxGRESPerJob",
    }
)

#: The deadline of one call: a controller that does not answer in this long is down.
CALL_TIMEOUT_S = 60.0

_FIX_UNREACHABLE = (
    "Check that Slurm answers here (`sinfo`, `scontrol ping`) and that this host is a "
    "login node of the cluster (munge key, slurm.conf)."
)


@dataclass(frozen=True, slots=True)
class JobState:
    """One job as `squeue`/`scontrol` report it."""

    job_id: str
    #: Slurm's state (PENDING, RUNNING, COMPLETED, TIMEOUT, ...), or VANISHED when
    #: the controller no longer knows the job.
    state: str
    node: str | None = None
    reason: str | None = None

    @property
    def active(self) -> bool:
        """Not ended yet."""
        return self.state in ACTIVE_STATES

    @property
    def running(self) -> bool:
        """Started on a node (and not ended)."""
        return self.state in {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT"}


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition as `sinfo` reports it (per node group)."""

    name: str
    default: bool
    state: str
    nodes: int
    gres: str


def in_allocation(environ: Mapping[str, str] | None = None) -> str | None:
    """The job id of the allocation this process runs in (`SLURM_JOB_ID`), if any."""
    env = os.environ if environ is None else environ
    return env.get("SLURM_JOB_ID") or None


async def slurm_call(
    argv: Sequence[str], *, timeout_s: float = CALL_TIMEOUT_S, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run one Slurm command, bounded; our error when it is missing, hangs or fails."""
    try:
        with anyio.fail_after(timeout_s):
            done = await anyio.run_process(list(argv), check=False)
    except FileNotFoundError as exc:
        raise EngineUnavailableError(
            f"{argv[0]} is not on PATH: this host has no Slurm client",
            fix_suggestion="Run the study on a login node of the cluster (or install "
            "slurm-client and its config), or choose another placement.",
        ) from exc
    except TimeoutError as exc:
        raise EngineUnavailableError(
            f"`{' '.join(argv[:2])}` did not answer within {timeout_s:g}s: the Slurm "
            "controller is down or overloaded",
            fix_suggestion=_FIX_UNREACHABLE,
        ) from exc
    if check and done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip()
        # A controller that cannot be reached is worth another attempt later.
        transient = any(t in said for t in ("Socket timed out", "Unable to contact", "try again"))
        raise ClusterError(
            f"`{' '.join(argv[:2])} ...` failed (exit {done.returncode}): {said[-500:]}",
            fix_suggestion=_FIX_UNREACHABLE if transient else "Read Slurm's message above.",
            transient=transient,
        )
    return done


async def sbatch(argv: Sequence[str], *, timeout_s: float = CALL_TIMEOUT_S) -> str:
    """Submit with `sbatch --parsable ...`; the new job's id."""
    done = await slurm_call(["sbatch", "--parsable", *argv], timeout_s=timeout_s)
    # --parsable prints "ID" or "ID;CLUSTER".
    job_id = done.stdout.decode().strip().split(";")[0]
    if not job_id.isdigit():
        raise ClusterError(f"sbatch printed no job id: {done.stdout[:200]!r}")
    return job_id


async def squeue_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """The state of each job: one `squeue` call for them all, `scontrol` for any it
    no longer lists (VANISHED when the controller has forgotten it)."""
    ids = sorted(set(job_ids), key=int)
    if not ids:
        return {}
    done = await slurm_call(
        ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%N|%r"], check=False
    )
    found: dict[str, JobState] = {}
    if done.returncode == 0:
        found = _parse_squeue(done.stdout.decode())
    elif b"Invalid job id" not in done.stderr:
        await slurm_call(["squeue", "-h", "-j", ids[0]])  # raises with Slurm's message
    for job_id in ids:
        if job_id not in found:
            found[job_id] = await _scontrol_state(job_id)
    return found


def _parse_squeue(text: str) -> dict[str, JobState]:
    found: dict[str, JobState] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4 or not parts[0]:
            continue
        # An array task or a heterogeneous job prints "ID_N" / "ID+N": ours are neither.
        found[parts[0]] = JobState(
            parts[0],
            parts[1].split()[0],
            parts[2] or None,
            None if parts[3] == "None" else parts[3],
        )
    return found


async def _scontrol_state(job_id: str) -> JobState:
    done = await slurm_call(["scontrol", "-o", "show", "job", job_id], check=False)
    if done.returncode != 0:
        return JobState(job_id, "VANISHED")
    fields = dict(item.split("=", 1) for item in done.stdout.decode().split() if "=" in item)
    node = fields.get("NodeList")
    return JobState(
        job_id,
        fields.get("JobState", "VANISHED"),
        None if node in {None, "(null)"} else node,
        fields.get("Reason"),
    )


async def scancel(
    job_ids: Iterable[str], *, timeout_s: float = CALL_TIMEOUT_S, signal: str | None = None
) -> None:
    """Cancel these jobs (one call); jobs already ended are no error.

    `signal` (TERM, KILL): only send it to every process of the running jobs, the
    batch step included, and leave them to end by themselves; a job cancelled
    outright gets SIGTERM and, Slurm's `KillWait` later, SIGKILL.
    """
    ids = sorted(set(job_ids), key=lambda i: int(i.split(".")[0]))
    if ids:
        how = [f"--signal={signal}", "--full"] if signal else []
        await slurm_call(["scancel", *how, *ids], timeout_s=timeout_s, check=False)


async def study_jobs(name_prefix: str) -> dict[str, str]:
    """Active jobs of this user whose name starts with `name_prefix`: id -> name."""
    done = await slurm_call(["squeue", "-h", "--me", "-o", "%i|%j"])
    jobs = (line.split("|", 1) for line in done.stdout.decode().splitlines() if "|" in line)
    return {i.strip(): n.strip() for i, n in jobs if n.strip().startswith(name_prefix)}


async def partitions() -> list[Partition]:
    """Every partition (one line per node group): name, default, state, nodes, GRES."""
    done = await slurm_call(["sinfo", "-h", "-o", "%P|%a|%D|%G"])
    found = []
    for line in done.stdout.decode().splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            name = parts[0]
            found.append(
                Partition(name.rstrip("*"), name.endswith("*"), parts[1], int(parts[2]), parts[3])
            )
    return found


def gpu_count(gres: str) -> int:
    """GPUs in a `sinfo` GRES string such as `gpu:4`, `gpu:a100:8(S:0-1)`, `gpu:2,shard:4`."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def time_s(value: str) -> float | None:
    """Seconds in a Slurm time (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]); None for no limit."""
    if value in {"UNLIMITED", "INFINITE"}:
        return None
    days, _, rest = value.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if len(parts) == 1:
        return parts[0] * 60.0
    if len(parts) == 2:
        return parts[0] * 60.0 + parts[1]
    return parts[0] * 3600.0 + parts[1] * 60 + parts[2]
