"""run_study: a study's experiments through one placement, into a results dir.

The placement is the local GPU pool (a `Dispatcher`) or a Ray cluster (a
`RayDispatcher`); everything else (journal, records, resume, cycles) is the same.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog
import yaml

from llem_dispatch import _labels
from llem_dispatch._docker import ApiDeadlines
from llem_dispatch._exchange import remove_stale_secrets
from llem_dispatch.cluster import RayDispatcher, sweep_orphans
from llem_dispatch.dispatch import (
    Dispatcher,
    Event,
    ExperimentRetried,
    ExperimentStarted,
    RetryPolicy,
    RunRecord,
)
from llem_dispatch.dispatch.fanout import fan_out
from llem_dispatch.errors import ConfigError, EngineHungError
from llem_dispatch.gpu import GpuPool, SettleSpec
from llem_dispatch.reap import reap
from llem_dispatch.runners import Runner
from llem_dispatch.runners.kinds import find_runner_kind
from llem_dispatch.study.plan import expand_study
from llem_dispatch.study.results import Journal, ResultsDir, StudySummary
from llem_dispatch.study.runner_choice import (
    StudyRunnerFactory,
    build_pool,
    check_function_importable,
    cluster_requirements,
    cluster_runner_spec,
    make_runner,
    resolve_runner,
)
from llem_dispatch.study.schema import Experiment, RunnerSpec, Study

__all__ = ["run_study"]

log = structlog.get_logger("llem_dispatch.study")


@dataclass
class _Placement:
    """Where a study's attempts run, and what the results dir says about it."""

    dispatcher: Dispatcher
    runner_name: str
    runner_source: str
    facts: dict[str, Any]
    #: Reap orphans before the study (`study_over=False`) and after it (`True`).
    sweep: Callable[[bool], Any] | None = None


async def run_study(
    study: Study,
    results_dir: str | Path,
    *,
    runner: Runner | None = None,
    pool: GpuPool | None = None,
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
    max_concurrency: int | None = None,
    study_dir: str | Path | None = None,
    runner_value: str | None = None,
    runner_spec: RunnerSpec | None = None,
    retry_policy: RetryPolicy | None = None,
    reap_orphans: bool = True,
    cluster: str | None = None,
    cluster_options: Mapping[str, Any] | None = None,
) -> StudySummary:
    """Run every experiment of `study`, writing records and a journal to `results_dir`.

    With `resume=True`, experiments that already succeeded there are skipped and
    failed or interrupted ones run again; each experiment ends with one record file.
    With `cluster` (or the study's `cluster:`), a Ray cluster's address, the
    experiments run on its nodes; records and the journal are still written here only.
    The runner is `runner`, else `runner_spec` (a choice already made, recorded with
    its source), else chosen from `runner_value` > LLEM_RUNNER > the study > auto.
    `cluster_options` go to `RayDispatcher` (e.g. `placement_timeout_s`, `runtime_env`).
    The results dir is held exclusively for the whole run: a second run on it is
    refused at once with `ResultsDirBusyError`.
    """
    started = time.monotonic()
    if study.cycle_order == "shuffled" and study.seed is None:
        # Record the seed (in study.yaml) so the order can be reproduced.
        study = study.model_copy(update={"seed": random.SystemRandom().randrange(2**31)})
    experiments = expand_study(study)
    with ResultsDir.open(results_dir, resume=resume) as results:
        journal_box: list[Journal] = []
        placement = await _place(
            study,
            experiments,
            results,
            runner=runner,
            pool=pool,
            max_concurrency=max_concurrency,
            study_dir=Path(study_dir) if study_dir is not None else Path.cwd(),
            runner_value=runner_value,
            runner_spec=runner_spec,
            retries=retry_policy or RetryPolicy(max_attempts=study.retries + 1),
            cluster=cluster or study.cluster,
            cluster_options=cluster_options,
            on_event=_journalling(journal_box, on_event),
        )
        if reap_orphans and placement.sweep is not None:
            await placement.sweep(False)
        for path in remove_stale_secrets(results.exchange):
            # A killed run's kept exchange dirs: plaintext secrets must not stay there.
            log.warning("stale_secrets_removed", path=str(path))
        # Records of configs no longer in the study are neither skipped nor run.
        done = results.completed_keys() & {e.key for e in experiments} if resume else set()
        todo = [e for e in experiments if e.key not in done]
        _write_study(results, study, placement, len(experiments))
        journal_box.append(results.start())
        _journal_start(results.journal, study, placement, len(experiments), len(done), resume)
        run = _StudyRun(study, placement, results, reap_orphans)
        await run.all(todo)
        return run.finish(total=len(experiments), skipped=len(done), started=started)


def _journal_start(
    journal: Journal, study: Study, placement: _Placement, total: int, skipped: int, resume: bool
) -> None:
    where = {"cluster": placement.facts["cluster"]} if "cluster" in placement.facts else {}
    journal.write(
        "study_started",
        sync=True,
        name=study.name,
        total=total,
        todo=total - skipped,
        skipped=skipped,
        resume=resume,
        runner=placement.runner_name,
        pid=os.getpid(),
        session=_labels.SESSION_ID,
        **where,
    )


class _StudyRun:
    """Every experiment through the placement, cycle by cycle; a record as each ends.

    When the Docker daemon stays hung past the retry budget, `stopped` says why and
    the rest is left for --resume.
    """

    def __init__(
        self, study: Study, placement: _Placement, results: ResultsDir, reap_orphans: bool
    ) -> None:
        self.study = study
        self.placement = placement
        self.results = results
        self.reap_orphans = reap_orphans
        self.in_flight: set[str] = set()
        self.records: list[RunRecord] = []
        self.stopped: str | None = None
        self._stop_scope = anyio.CancelScope()

    async def all(self, todo: list[Experiment]) -> None:
        """Run `todo`; the journal says `interrupted` or `crashed` if it does not end."""
        try:
            async with self.placement.dispatcher:
                try:
                    with self._stop_scope:
                        await self._cycles(todo)
                finally:
                    if self.reap_orphans and self.placement.sweep is not None:
                        # Every experiment has its final record (or was cancelled and
                        # waited for): whatever container of this study is left on a
                        # node is abandoned, e.g. by a worker of a node that left.
                        with anyio.move_on_after(90, shield=True):
                            await self.placement.sweep(True)
        except BaseException as exc:
            interrupted = isinstance(exc, anyio.get_cancelled_exc_class() | KeyboardInterrupt)
            self.results.journal.write(
                "interrupted" if interrupted else "crashed",
                sync=True,
                in_flight=sorted(self.in_flight),
                error=repr(exc)[:500],
            )
            raise

    def finish(self, *, total: int, skipped: int, started: float) -> StudySummary:
        """The summary, written to summary.json and journalled as `study_finished`."""
        records = self.records
        summary = StudySummary(
            name=self.study.name,
            results_dir=str(self.results.path),
            total=total,
            succeeded=sum(r.status == "succeeded" for r in records),
            failed=sum(r.status == "failed" for r in records),
            errored=sum(r.status in {"error", "cancelled"} for r in records),
            skipped=skipped,
            stopped=self.stopped,
            duration_s=round(time.monotonic() - started, 3),
            runner=self.placement.runner_name,
            records=records,
        )
        self.results.write_json("summary.json", summary.model_dump(mode="json"))
        fields = summary.model_dump(mode="json", exclude={"name"})
        self.results.journal.write("study_finished", sync=True, **fields)
        return summary

    async def _cycles(self, todo: list[Experiment]) -> None:
        study = self.study
        groups: list[list[Experiment]] = [todo]
        if study.cycle_gap_s > 0 and study.n_cycles > 1:
            groups = [[e for e in todo if e.cycle == c] for c in range(1, study.n_cycles + 1)]
        workers = 2 * self.placement.dispatcher.parallelism()
        for index, group in enumerate(groups):
            if index and study.cycle_gap_s:
                self.results.journal.write("cycle_gap", seconds=study.cycle_gap_s)
                await anyio.sleep(study.cycle_gap_s)
            async with contextlib.aclosing(fan_out(group, self.one, workers=workers)) as done:
                async for _ in done:
                    pass  # each record was written by the task that ran it

    async def one(self, exp: Experiment) -> RunRecord:
        """Run one experiment and write its record the moment it ends."""
        self.in_flight.add(exp.key)
        tags = {"key": exp.key, "cycle": exp.cycle}
        record = await self.placement.dispatcher.run(exp.config, gpus=exp.gpus, tags=tags)
        # Written by the task that ran it: a cancel or crash right after loses
        # nothing that finished.
        _record(self.results, exp, record)
        # The summary keeps the record, not the exception (its frames) nor the
        # validated outcome object beside its JSON form.
        self.records.append(record.model_copy(update={"outcome": None, "exception": None}))
        self.in_flight.discard(exp.key)
        # A class check (any engine's hang), on the exception the record was made from.
        hung = isinstance(record.exception, EngineHungError)
        if hung and record.error is not None and self.stopped is None:
            self._stop(f"{record.error.message} (experiment {exp.key})", record)
        return record

    def _stop(self, reason: str, record: RunRecord) -> None:
        """Everything else would only hang too: stop dispatching, and cancel what is
        in flight (it gets no record, so --resume runs it again)."""
        self.stopped = reason
        self.results.journal.write(
            "stopped", sync=True, reason=reason, in_flight=sorted(self.in_flight)
        )
        fix = record.error.fix_suggestion if record.error else None
        log.error("study_stopped", reason=reason, fix=fix)
        self._stop_scope.cancel()


def _record(results: ResultsDir, exp: Experiment, record: RunRecord) -> None:
    """One experiment's record file, then its journal line (fsynced)."""
    payload = record.model_dump(mode="json")
    payload["cycle"] = exp.cycle
    payload["key"] = exp.key
    results.write_record(exp.key, payload)
    results.journal.write(
        record.status,
        sync=True,
        key=exp.key,
        config_hash=exp.config_hash,
        cycle=exp.cycle,
        gpu_ids=record.gpu_ids,
        error=record.error.type if record.error else None,
        exchange_dir=record.exchange_dir,
        **({"node": record.node.label} if record.node else {}),
    )


def _journalling(
    journal_box: list[Journal], on_event: Callable[[Event], None] | None
) -> Callable[[Event], None]:
    """The dispatcher's event hook: starts and retries go to the journal, all to `on_event`."""

    def handle(event: Event) -> None:
        journal = journal_box[0] if journal_box else None
        if journal is not None and isinstance(event, ExperimentStarted):
            where: dict[str, Any] = {"node": event.node} if event.node else {}
            journal.write(
                "started",
                key=event.tags.get("key"),
                gpu_ids=list(event.gpu_ids),
                attempt=event.attempt,
                container_id=event.container_id,
                pid=event.process_id,
                **where,
            )
        elif journal is not None and isinstance(event, ExperimentRetried):
            journal.write(
                "retried",
                key=event.tags.get("key"),
                attempt=event.attempt,
                error=event.error,
                delay_s=event.delay_s,
            )
        if on_event is not None:
            on_event(event)

    return handle


def _write_study(results: ResultsDir, study: Study, placement: _Placement, total: int) -> None:
    """study.json (the study as resolved, and where it runs) and study.yaml beside it."""
    dump = study.model_dump(mode="json")
    results.write_json(
        "study.json",
        {
            "study": dump,
            "runner": placement.runner_name,
            "runner_source": placement.runner_source,
            **placement.facts,
            "experiments": total,
        },
    )
    results.write_text("study.yaml", yaml.safe_dump(dump, sort_keys=False))


async def _place(
    study: Study,
    experiments: list[Experiment],
    results: ResultsDir,
    *,
    runner: Runner | None,
    pool: GpuPool | None,
    max_concurrency: int | None,
    study_dir: Path,
    runner_value: str | None,
    runner_spec: RunnerSpec | None,
    retries: RetryPolicy,
    cluster: str | None,
    cluster_options: Mapping[str, Any] | None,
    on_event: Callable[[Event], None],
) -> _Placement:
    """The dispatcher for this study: the local GPU pool, or a Ray cluster's nodes."""
    needed = max((e.gpus for e in experiments), default=0)
    limit = max_concurrency or study.max_concurrency
    labels = {_labels.LABEL_RESULTS_DIR: str(results.path)}
    if cluster:
        if runner is not None or pool is not None:
            raise ConfigError(
                "a cluster study builds its runners on each node: runner= and pool= "
                "cannot be used with cluster=",
                fix_suggestion="Drop runner=/pool= (choose with runner_value=), or run "
                "without a cluster.",
            )
        spec = runner_spec or cluster_runner_spec(runner_value, study)
        return await _place_on_cluster(
            study,
            experiments,
            results,
            spec,
            study_dir,
            labels,
            needed,
            cluster,
            dict(cluster_options or {}),
            {"max_concurrency": limit, "retries": retries, "on_event": on_event},
        )
    return await _place_locally(
        study,
        experiments,
        results,
        runner=runner,
        pool=pool,
        study_dir=study_dir,
        spec=runner_spec if runner is None else None,
        runner_value=runner_value,
        labels=labels,
        needed=needed,
        dispatch={"max_concurrency": limit, "retries": retries, "on_event": on_event},
    )


async def _place_locally(
    study: Study,
    experiments: list[Experiment],
    results: ResultsDir,
    *,
    runner: Runner | None,
    pool: GpuPool | None,
    study_dir: Path,
    spec: RunnerSpec | None,
    runner_value: str | None,
    labels: dict[str, str],
    needed: int,
    dispatch: dict[str, Any],
) -> _Placement:
    """This host's GPU pool and the study's runner (or the ones given)."""
    pool = pool if pool is not None else build_pool(study)
    pool.check_request(needed)
    if runner is None:
        spec = spec or resolve_runner(runner_value, study)
        runner = make_runner(
            study,
            spec,
            study_dir=study_dir,
            labels=labels,
            experiments=experiments,
            virtual=pool.virtual,
            exchange_base=results.exchange,
        )
        await check_function_importable(study, spec, experiments, study_dir=study_dir)
    dispatcher = Dispatcher(runner, pool=pool, prestart=study.prestart, **dispatch)
    name = spec.kind if spec else (dispatcher.runner_type or "custom")
    # A runner given ready-made is known by its runner_type (a custom one by no kind).
    kind = spec.runner_kind() if spec else find_runner_kind(name)
    reapable = kind is not None and kind.reapable
    deadlines = ApiDeadlines(**study.docker_deadlines)

    async def sweep(study_over: bool) -> None:
        if not study_over:
            logs = results.path / "orphans"
            await reap(results_dir=results.path, logs_dir=logs, deadlines=deadlines)

    return _Placement(
        dispatcher,
        name,
        spec.source if spec else "explicit",
        {"gpus": list(pool.devices), "virtual_gpus": pool.virtual},
        sweep if reapable else None,
    )


async def _place_on_cluster(
    study: Study,
    experiments: list[Experiment],
    results: ResultsDir,
    spec: RunnerSpec,
    study_dir: Path,
    labels: dict[str, str],
    needed: int,
    address: str,
    options: dict[str, Any],
    common: dict[str, Any],
) -> _Placement:
    """A RayDispatcher over the cluster at `address`, checked on every host first."""
    if study.gpus is not None or study.virtual_gpus is not None:
        log.warning(
            "study_gpus_ignored_on_cluster",
            message="`gpus:`/`virtual_gpus:` choose GPUs of one host; on a Ray cluster, "
            "Ray assigns each node's GPUs (set them with `ray start --num-gpus N`).",
        )
    if study.prestart:
        log.warning(
            "study_prestart_ignored_on_cluster",
            message="`prestart:` holds containers at a gate on this host's GPU pool; "
            "a Ray cluster's placements start each experiment when its GPUs are free.",
        )
    # Shipped to every attempt: one experiment per backend, not the whole study.
    per_backend = {str(e.config.get(study.image_field)): e for e in experiments}
    factory = StudyRunnerFactory(
        study,
        spec,
        study_dir.resolve(),
        labels,
        tuple(per_backend.values()) if study.images else (),
        results.exchange,
    )
    dispatcher = RayDispatcher(
        factory,
        address=address,
        cooldown_s=study.experiment_gap_s,
        # The thermal gate runs in each task, on its node's own GPUs.
        settle=SettleSpec(**study.settle.model_dump()) if study.settle else None,
        runner_type=spec.kind,
        **common,
        **{"cancel_timeout_s": study.stop_grace_s + 30, **options},
    )
    dispatcher.check_request(needed)
    images, paths = cluster_requirements(study, spec, experiments, study_dir)
    await dispatcher.require_ready(images=images, paths=paths, runner_kind=spec.kind, gpus=needed)

    async def sweep(study_over: bool) -> None:
        await sweep_orphans(dispatcher, results.path, study_over=study_over)

    return _Placement(
        dispatcher,
        spec.kind,
        spec.source,
        {"cluster": address, "cluster_gpus": dispatcher.cluster_gpus()},
        sweep,
    )
