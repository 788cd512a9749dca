"""The Slurm placement: each attempt of an experiment as one Slurm job (or job step).

Slurm does the GPU accounting: a job asks for its number of GPUs (`--gpus=N` or
`--gres=gpu:N`) and runs `python -m llem_dispatch.slurm.job DIR`, which builds the
study's runner on the node and writes its outcome into DIR, on the filesystem
the driver and the nodes share. From a login node every attempt is a job of its
own, followed by one `squeue` call per interval for the whole study and a `stat`
of its `started.json` and `outcome.json` every `file_poll_interval_s` (`JobWatch`):
a job that wrote its result is taken at once (it exits 0, which Slurm records as
COMPLETED), and `squeue` tells how any other end came about. Inside an allocation
(`SLURM_JOB_ID` set) every attempt is a job step, run by `srun` (see
`slurm.steps`). Cancelling cancels the job (`scancel`) and waits for it to leave,
bounded; a resumed study adopts the jobs its dead driver left queued or running
(the ledger in the results dir) instead of submitting again.
"""

from __future__ import annotations

import math
import pickle
import shlex
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import anyio
import structlog
from pydantic import BaseModel

from llem_dispatch.dispatch import (
    HostContext,
    HostRunnerFactory,
    Placement,
    PlacementRequest,
    RecordDraft,
)
from llem_dispatch.errors import (
    ClusterError,
    ConfigError,
    ExperimentTimeoutError,
    GpuRequestError,
)
from llem_dispatch.gpu import SettleSpec
from llem_dispatch.gpu.attempt_telemetry import NodeTelemetry
from llem_dispatch.models import ExperimentFailure, ExperimentResult, HashedConfig
from llem_dispatch.runners import ForceKill, current_force_kill
from llem_dispatch.runners.kinds import DoctorCheck
from llem_dispatch.runners.protocol import Outcome, Runner
from llem_dispatch.slurm import commands
from llem_dispatch.slurm.attempts import Attempt, Ledger, fill_started, outcome_of
from llem_dispatch.slurm.commands import NEVER_STARTS, JobState, gpu_count
from llem_dispatch.slurm.doctor import doctor_checks
from llem_dispatch.slurm.job import OUTCOME_FILE, STARTED_FILE
from llem_dispatch.slurm.jobspec import JobTemplate
from llem_dispatch.slurm.live import LiveJobs
from llem_dispatch.slurm.settings import SlurmSettings
from llem_dispatch.slurm.steps import StepRunner
from llem_dispatch.slurm.watch import JobWatch

__all__ = ["SlurmPlacement"]

log = structlog.get_logger("llem_dispatch.slurm")


def _slurm_settings(settings: BaseModel | None) -> SlurmSettings:
    """The study's `slurm:` block, as validated at load (the defaults when there is none)."""
    if settings is None:
        return SlurmSettings()
    if not isinstance(settings, SlurmSettings):
        raise TypeError(f"the Slurm placement's settings are SlurmSettings, not {type(settings)}")
    return settings


def _no_runner(host: HostContext) -> Runner:
    """The runner factory of `doctor`'s probe placement, which runs no experiment."""
    raise ConfigError("doctor's Slurm probe runs no experiment")


class SlurmPlacement(Placement):
    """Runs each attempt as a Slurm job on a node Slurm chooses, with the GPUs it gives.

    `runner_factory(HostContext) -> Runner` is pickled into the results dir and
    called by each job on its node. Chosen by a study as `placement: slurm`, with
    its `slurm:` block (`SlurmSettings`).
    """

    #: Each job builds the runner on its node (`auto` decided there).
    on_this_host = False
    STUDY_SWEEP_S: ClassVar[float] = 60.0
    settings_model: ClassVar[type[BaseModel] | None] = SlurmSettings
    gpus_assigned_elsewhere: ClassVar[tuple[str, str]] = (
        "under Slurm each job gets the GPUs Slurm assigns it",
        "Drop them; give each experiment's GPU count with `gpus_per_experiment`.",
    )

    def __init__(
        self,
        runner_factory: HostRunnerFactory,
        results_dir: Path,
        *,
        settings: SlurmSettings | None = None,
        study_name: str = "study",
        cooldown_s: float = 0.0,
        settle: SettleSpec | None = None,
        telemetry: NodeTelemetry | None = None,
        timeout_s: float | None = None,
        runner_type: str = "slurm",
        result_model: type[BaseModel] = ExperimentResult,
        cpus_per_gpu: int | None = None,
        stop_grace_s: float = 10.0,
        force_kill: ForceKill | None = None,
    ) -> None:
        self.runner_factory = runner_factory
        self.settings = settings or SlurmSettings()
        self.base = Path(results_dir) / "slurm"
        self.study_name = study_name
        self._factory_path = self.base / "runner_factory.pkl"
        #: What every job of the study asks for and runs.
        self.jobs = JobTemplate(
            self.settings,
            study_name,
            self._factory_path,
            cooldown_s=cooldown_s,
            settle=settle,
            timeout_s=timeout_s,
            cpus_per_gpu=cpus_per_gpu,
            telemetry=telemetry,
        )
        self.runner_type = runner_type
        self.result_model = result_model
        self.ledger = Ledger(self.base / "jobs.jsonl")
        self.watch = JobWatch(
            self.settings.poll_interval_s,
            self.settings.max_poll_interval_s,
            look_interval_s=self.settings.file_poll_interval_s,
        )
        #: The allocation this driver runs in: attempts are its job steps then.
        self.allocation = commands.in_allocation()
        self.steps = StepRunner(self.settings) if self.allocation else None
        self._queue = anyio.Semaphore(self.settings.max_queued)
        #: At most this many `sbatch` processes at once: a study's start is not a burst
        #: of hundreds of calls on a shared login node and its controller.
        self._submitting = anyio.CapacityLimiter(8)
        self._largest_node: int | None = None
        self._total_gpus = 0
        self._adoptable: dict[str, list[Attempt]] = {}
        #: The study's jobs in the queue; a forced stop (`force_kill`) kills them at once.
        self.queue = LiveJobs(
            self.settings,
            self.watch,
            self.ledger,
            force_kill or current_force_kill(),
            grace_s=stop_grace_s,
        )
        self._live = self.queue.live
        self._exiting = self.queue.exiting

    # -- study-level hooks ----------------------------------------------------------

    @classmethod
    def for_study(cls, request: PlacementRequest, settings: BaseModel | None) -> SlurmPlacement:
        """The study's runner factory, run by jobs of the study's name."""
        return cls(
            request.runner_factory,
            request.results_dir,
            settings=_slurm_settings(settings),
            study_name=request.study_name or request.results_dir.name,
            cooldown_s=request.cooldown_s,
            settle=request.settle,
            telemetry=request.telemetry,
            timeout_s=request.timeout_s,
            runner_type=request.runner_kind,
            cpus_per_gpu=request.cpus_per_gpu,
            stop_grace_s=request.stop_grace_s,
            force_kill=request.force_kill,
        )

    @classmethod
    def stop_bound_s(cls, stop_grace_s: float, settings: BaseModel | None) -> float:
        """The jobs cancelled stopping within their grace (or cancelled outright after it),
        those exiting after their result was taken leaving the queue; the sweep."""
        slurm = _slurm_settings(settings)
        exiting_s = commands.CALL_TIMEOUT_S + slurm.cancel_timeout_s
        return LiveJobs.bound_s(slurm, stop_grace_s) + exiting_s + cls.STUDY_SWEEP_S

    @classmethod
    async def doctor_checks(cls, settings: BaseModel | None, folder: Path) -> list[DoctorCheck]:
        """Slurm answers; its partitions and their GPUs; a job can write into `folder`."""
        slurm = _slurm_settings(settings)
        return await doctor_checks(
            lambda scratch: cls(_no_runner, scratch, settings=slurm, study_name="doctor"), folder
        )

    @property
    def gpus(self) -> tuple[int, int | None]:
        """GPUs in the partition, and on its largest node (after `survey`)."""
        return self._total_gpus, self._largest_node

    async def prepare(self, request: PlacementRequest) -> None:
        """Slurm answers, the GPUs asked for exist on one node, the results dir is shared."""
        if request.host_gpus.chosen or request.pool is not None or request.prestart:
            log.warning(
                "study_host_options_ignored_on_slurm",
                message="`gpus:`, `virtual_gpus:` and `prestart:` choose GPUs of this host; "
                "under Slurm each job gets the GPUs Slurm assigns it.",
            )
        await self.survey()
        self.check_request(request.max_gpu_count)
        self.base.mkdir(parents=True, exist_ok=True)
        self._write_factory()
        if self.settings.check_shared_fs:
            await self.check_shared()
        await self._find_adoptable()

    async def survey(self) -> None:
        """Ask Slurm for the partition's nodes and GPUs (raises when Slurm does not answer)."""
        part = self.settings.partition
        argv = ["sinfo", "-h", "-N", "-o", "%N|%G|%P"]
        if part:
            argv[2:2] = ["-p", part]
        done = await commands.slurm_call(argv)
        per_node: dict[str, int] = {}
        for line in done.stdout.decode().splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and (part or parts[2].endswith("*")):
                per_node[parts[0]] = gpu_count(parts[1])
        if not per_node:
            raise ConfigError(
                f"Slurm shows no node in partition {part!r}"
                if part
                else "Slurm shows no default partition",
                fix_suggestion="Name a partition that exists (`sinfo -s`) in `slurm: "
                "{partition: ...}`.",
            )
        self._largest_node = max(per_node.values())
        self._total_gpus = sum(per_node.values())

    def _write_factory(self) -> None:
        try:
            data = pickle.dumps(self.runner_factory)
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise ConfigError(
                f"the runner factory cannot be sent to Slurm jobs: {exc}",
                fix_suggestion="Use a module-level function, a functools.partial or a "
                "dataclass as the runner factory.",
            ) from exc
        self._factory_path.write_bytes(data)
        self._factory_path.chmod(0o600)

    async def check_shared(self) -> None:
        """A small job writes a marker into the results dir; the driver must see it."""
        attempt = Attempt.new(self.base, "shared-fs-check")
        marker = attempt.folder / "marker"
        script = f"hostname > {shlex.quote(str(marker))}"
        if self.allocation:
            # A step of the allocation: a new job would wait behind the allocation itself.
            argv = ["srun", "--exact", "--nodes=1", "--ntasks=1", "sh", "-c", script]
            await commands.slurm_call(argv, timeout_s=self.settings.shared_fs_timeout_s)
            if not marker.exists():
                raise ConfigError(
                    f"a step of allocation {self.allocation} wrote into {attempt.folder} but "
                    "this process cannot see the file: the results dir is not on a "
                    "filesystem the nodes share",
                    fix_suggestion="Put the results dir (-o) on the cluster's shared "
                    "filesystem (home, project or scratch).",
                )
            shutil.rmtree(attempt.folder, ignore_errors=True)
            return
        attempt.job_id = await self._submit_script(
            attempt, script, gpus=0, name=f"llem-{self.study_name}-check"
        )
        self._live[attempt.job_id] = attempt
        seen = False
        try:
            with anyio.move_on_after(self.settings.shared_fs_timeout_s):
                found = await self.watch.wait_or_file(
                    attempt.job_id, lambda s: not s.active or s.reason in NEVER_STARTS, (marker,)
                )
                if not isinstance(found, JobState):
                    # Seen as the job writes it: it exits by itself (the study waits for
                    # it to leave the queue before it ends).
                    seen = True
                    self._exiting.add(attempt.job_id)
                    shutil.rmtree(attempt.folder, ignore_errors=True)
                    return
                state = found
                if state.active:
                    raise ConfigError(
                        f"Slurm keeps the study's first job ({attempt.job_id}) pending for a "
                        f"reason that will not pass: {state.reason}",
                        fix_suggestion="Fix the `slurm:` block (time_limit within the "
                        "partition's MaxTime, `sinfo -s`; the account, QOS or constraint).",
                    )
                if marker.exists():
                    shutil.rmtree(attempt.folder, ignore_errors=True)
                    return
                raise ConfigError(
                    f"a Slurm job (id {attempt.job_id}, ended {state.state}, on "
                    f"{state.node or '?'}) wrote into {attempt.folder} but this host cannot "
                    "see the file: the results dir is not on a filesystem the nodes share",
                    fix_suggestion="Put the results dir (-o) on the cluster's shared "
                    "filesystem (home, project or scratch).",
                )
            raise ClusterError(
                f"the shared-filesystem check job {attempt.job_id} did not end within "
                f"{self.settings.shared_fs_timeout_s:g}s (the queue is busy?)",
                fix_suggestion="Raise `slurm: {shared_fs_timeout_s: ...}`, or turn the check "
                "off with `slurm: {check_shared_fs: false}` if you know the dir is shared.",
            )
        finally:
            last = self.watch.state(attempt.job_id)
            if not seen and (last is None or last.active):
                await self.queue.cancel(attempt)
            self._live.pop(attempt.job_id, None)
            self.watch.forget(attempt.job_id)

    async def _find_adoptable(self) -> None:
        """Jobs of a dead run of this study that are still queued, running, or ended with
        a result no record holds yet: attempts of the same config take them over."""
        open_jobs = self.ledger.open_jobs()
        if not open_jobs:
            return
        states = await commands.squeue_states(a.job_id for a in open_jobs if a.job_id)
        for attempt in open_jobs:
            state = states.get(attempt.job_id or "")
            done = attempt.outcome
            if (state is not None and state.active) or (done or {}).get("kind") == "result":
                attempt.adopted = True
                self._adoptable.setdefault(attempt.config_hash, []).append(attempt)
                if state is not None and state.active:
                    self._live[str(attempt.job_id)] = attempt
        log.info("slurm_jobs_adoptable", jobs=sum(len(v) for v in self._adoptable.values()))

    async def sweep(self, request: PlacementRequest, *, study_over: bool) -> None:
        """After the study: cancel any job of it still in the queue (none normally)."""
        if study_over:
            await self.queue.cancel_all()
            await self.queue.until_exited()

    def describe(self) -> Mapping[str, Any]:
        """Where the study runs: the partition, the allocation, and the GPUs Slurm showed."""
        return {
            "slurm": {
                "partition": self.settings.partition,
                "allocation": self.allocation,
                "gpus": self._total_gpus,
                "largest_node_gpus": self._largest_node,
            }
        }

    # -- attempt-level --------------------------------------------------------------

    def check_request(self, gpus: int) -> None:
        """One experiment runs on one node: more GPUs than any node has is an error now."""
        largest = self._largest_node
        if gpus and largest is not None and gpus > largest:
            raise GpuRequestError(
                f"an experiment asks for {gpus} GPU(s) but the largest node of the partition "
                f"has {largest}; one experiment never spans nodes",
                fix_suggestion=f"Ask for at most {largest} GPU(s) per experiment, or choose "
                "a partition with larger nodes.",
            )

    def parallelism(self) -> int:
        """Every GPU of the partition, plus the jobs that may wait in the queue."""
        return max(8, self._total_gpus + self.settings.max_queued)

    async def attempt(
        self,
        config: HashedConfig,
        gpus: int,
        draft: RecordDraft,
        on_started: Callable[[], None],
    ) -> Outcome:
        """Run one attempt as a Slurm job (or step) of `gpus` GPUs; read its outcome."""
        if self.steps is not None:
            return await self._step_attempt(config, gpus, draft, on_started)
        adopted = self._adoptable.get(config.config_hash)
        attempt = adopted.pop(0) if adopted else None
        queued = False
        try:
            if attempt is None:
                await self._queue.acquire()
                queued = True
                attempt = Attempt.new(self.base, config.config_hash)
                attempt.write_spec(self.jobs.spec(config))
                await self._submit(attempt, gpus, config)
            else:
                log.info(
                    "slurm_job_adopted", job_id=attempt.job_id, config_hash=attempt.config_hash
                )
            began = await self._until_started(attempt)
            if queued:
                self._queue.release()
                queued = False
            fill_started(draft, attempt, began.node if began else None)
            if attempt.started is not None:
                on_started()
            state = began if began and not began.active else await self._until_ended(attempt)
            return self._ended(attempt, state, draft)
        except anyio.get_cancelled_exc_class():
            if attempt is not None:
                await self.queue.cancel(attempt)
            raise
        finally:
            if queued:
                self._queue.release()
            if attempt is not None and attempt.job_id is not None:
                self.watch.forget(attempt.job_id)

    async def _step_attempt(
        self,
        config: HashedConfig,
        gpus: int,
        draft: RecordDraft,
        on_started: Callable[[], None],
    ) -> Outcome:
        """Inside an allocation: the attempt as one of its job steps."""
        assert self.steps is not None
        attempt = Attempt.new(self.base, config.config_hash)
        attempt.write_spec(self.jobs.spec(config))
        argv = [
            "srun",
            "--exact",
            "--nodes=1",
            "--ntasks=1",
            *self.sbatch_options(gpus, self.jobs.job_name(config), step=True),
            f"--output={attempt.folder}/slurm-%j.%s.out",
            *self.jobs.command(attempt.folder),
        ]
        outcome = await self.steps.run(
            attempt, argv, draft, on_started, self.result_model, self.jobs.own_bound_s()
        )
        return self._tidy(attempt, draft, outcome)

    @staticmethod
    def _tidy(attempt: Attempt, draft: RecordDraft, outcome: Outcome) -> Outcome:
        """As an exchange dir: the attempt dir is kept for a failure, removed after a result."""
        if not isinstance(outcome, ExperimentFailure):
            shutil.rmtree(attempt.folder, ignore_errors=True)
            draft.exchange_dir = None
        return outcome

    def _ended(self, attempt: Attempt, state: JobState, draft: RecordDraft) -> Outcome:
        assert attempt.job_id is not None
        self._live.pop(attempt.job_id, None)
        fill_started(draft, attempt, state.node)
        try:
            outcome = outcome_of(attempt, state.state, draft, self.result_model)
        finally:
            # Written after the outcome was read: a driver killed before this adopts it.
            self.ledger.ended(attempt, state.state)
        return self._tidy(attempt, draft, outcome)

    async def _until_started(self, attempt: Attempt) -> JobState | None:
        """Until the job has begun the experiment (its started.json), or has ended.

        None when its files said so first (started.json, or outcome.json from a job that
        failed before it began); else Slurm's state. A job Slurm keeps pending for a
        reason that never passes (a time limit over the partition's, a wrong account) is
        cancelled and named, not waited for forever.
        """
        assert attempt.job_id is not None
        found = await self.watch.wait_or_file(
            attempt.job_id,
            lambda s: not s.active or s.reason in NEVER_STARTS,
            (attempt.folder / STARTED_FILE, attempt.folder / OUTCOME_FILE),
        )
        if not isinstance(found, JobState):
            return None
        state = found
        if state.active and state.reason in NEVER_STARTS:
            await self.queue.cancel(attempt)
            raise ConfigError(
                f"Slurm keeps job {attempt.job_id} pending for a reason that will not pass: "
                f"{state.reason}",
                fix_suggestion="Fix the `slurm:` block (time_limit within the partition's "
                "MaxTime, `sinfo -s`; the account, QOS or constraint: `sacctmgr show assoc`).",
                config_hash=attempt.config_hash,
            )
        return state

    async def _until_ended(self, attempt: Attempt) -> JobState:
        """Until the job ends; past our own bound, cancel it and raise the timeout.

        A job whose outcome file holds a result ends now: it exits 0 right after
        writing it, which Slurm records as COMPLETED, so no poll has to say so (the
        study still waits for it to leave the queue before it ends). Any other outcome
        (an error, a failure, a stop) is classified by Slurm's state, which may say
        more (OUT_OF_MEMORY, TIMEOUT, PREEMPTED, cancelled from outside): one poll now,
        then at the poll interval, as for a job that died without writing.
        """
        assert attempt.job_id is not None
        job_id = attempt.job_id
        bound = self.jobs.own_bound_s()
        with anyio.move_on_after(bound if bound is not None else math.inf):
            found = await self.watch.wait_or_file(
                job_id, lambda s: not s.active, (attempt.folder / OUTCOME_FILE,)
            )
            if isinstance(found, JobState):
                return found
            if (attempt.outcome or {}).get("kind") == "result":
                self._exiting.add(job_id)
                return JobState(job_id, "COMPLETED")
            self.watch.hurry()
            return await self.watch.wait(job_id, lambda s: not s.active)
        await self.queue.cancel(attempt)
        self.ledger.ended(attempt, "TIMEOUT")
        raise ExperimentTimeoutError(
            f"Slurm job {attempt.job_id} ran past {bound:g}s (the study's timeout and its "
            "margin) and was cancelled",
            config_hash=attempt.config_hash,
            exchange_dir=attempt.folder,
            stderr_snippet=attempt.log_tail(),
        )

    # -- Slurm calls ----------------------------------------------------------------

    def sbatch_options(self, gpus: int, name: str, *, step: bool = False) -> list[str]:
        """The options every job of this study gets (a step: those within an allocation)."""
        return self.jobs.sbatch_options(gpus, name, step=step)

    async def _submit(self, attempt: Attempt, gpus: int, config: HashedConfig) -> None:
        command = shlex.join(["exec", *self.jobs.command(attempt.folder)])
        attempt.job_id = await self._submit_script(
            attempt, command, gpus=gpus, name=self.jobs.job_name(config)
        )
        # In the ledger before anything waits on it: a driver killed now leaves it adoptable.
        self.ledger.submitted(attempt, gpus)
        self._live[attempt.job_id] = attempt
        self.watch.track(attempt.job_id)

    async def _submit_script(self, attempt: Attempt, script: str, *, gpus: int, name: str) -> str:
        argv = [
            *self.sbatch_options(gpus, name),
            f"--output={attempt.folder}/slurm-%j.out",
            f"--chdir={attempt.folder}",
            "--wrap",
            script,
        ]
        async with self._submitting:
            with anyio.CancelScope(shield=True):
                # Shielded: a cancel mid-call would leave a job we never learn the id of.
                job_id = await commands.sbatch(argv)
        return job_id

    async def aclose(self) -> None:
        """Cancel any job still live (attempts cancel their own; this is the backstop)."""
        if self.steps is not None:
            await self.steps.aclose()
        await self.queue.cancel_all()
        await self.queue.until_exited()
