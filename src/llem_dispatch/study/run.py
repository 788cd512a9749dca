"""run_study: a study's experiments through one placement, into a results dir.

The placement is chosen once, by name, from the study (`placement:`; the local
GPU pool by default, a Ray cluster with `placement: ray`): it is built from a
typed `PlacementRequest` and only its public hooks are called here, so
everything else (journal, records, resume, cycles) is the same for all.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

import anyio
import structlog
import yaml

from llem_dispatch import _labels
from llem_dispatch._exchange import remove_stale_secrets
from llem_dispatch._sizes import parse_size
from llem_dispatch.dispatch import (
    Dispatcher,
    Event,
    ExperimentRetried,
    ExperimentStarted,
    HostContext,
    HostNeeds,
    HostRunnerFactory,
    Placement,
    PlacementRequest,
    RetryPolicy,
    RunRecord,
    placement_class,
)
from llem_dispatch.dispatch.fanout import fan_out
from llem_dispatch.errors import ConfigError, EngineHungError
from llem_dispatch.gpu.telemetry import TelemetrySampler
from llem_dispatch.runners import Runner
from llem_dispatch.runners.kinds import find_runner_kind
from llem_dispatch.study.adaptive import CycleHistory, Unresolved
from llem_dispatch.study.chains import CycleChains
from llem_dispatch.study.plan import cycle_experiments, expand_study, unique_configs
from llem_dispatch.study.request import StudyOptions, StudyRequest
from llem_dispatch.study.results import Journal, ResultsDir, StudySummary, iter_records
from llem_dispatch.study.runner_choice import (
    StudyRunnerFactory,
    check_function_importable,
    cluster_requirements,
    cluster_runner_spec,
    host_gpus,
    resolve_runner,
)
from llem_dispatch.study.schema import Experiment, RunnerSpec, Study
from llem_dispatch.study.telemetry import node_telemetry, record_energy, start_telemetry

__all__ = ["StudyOptions", "StudyRequest", "run_study"]

log = structlog.get_logger("llem_dispatch.study")


@dataclass(frozen=True, slots=True)
class _Placed:
    """The study's placement, the request it was built from, and what the results dir says."""

    placement: Placement
    request: PlacementRequest
    runner_name: str
    runner_source: str
    #: Where the study runs (`Placement.describe`), for study.json and the journal.
    facts: dict[str, Any]


async def run_study(
    request: StudyRequest | Study,
    results_dir: str | Path | None = None,
    **options: Unpack[StudyOptions],
) -> StudySummary:
    """Run every experiment of a study, writing records and a journal to its results dir.

    Takes a `StudyRequest`, or a `Study`, the results dir and the request's fields as
    keywords (`StudyRequest.of`). With `resume`, experiments that already succeeded
    there are skipped and failed or interrupted ones run again; each experiment ends
    with one record file. The study's `placement:` says where experiments run (this
    host's GPUs by default); records and the journal are written here only. GPU
    telemetry (`telemetry:`) samples this host's real GPUs; on Ray and Slurm each
    attempt's GPUs are sampled where it runs. The results dir is held exclusively for
    the whole run: a second run on it is refused at once with `ResultsDirBusyError`.
    Everything the run opens is closed by one exit stack, in reverse order, each
    close bounded; its `force_kill` is current for all it runs.
    """
    if isinstance(request, Study):
        if results_dir is None:
            raise TypeError("run_study(study, results_dir, ...): the results dir is missing")
        request = StudyRequest.of(request, results_dir, **options)
    elif results_dir is not None or options:
        raise TypeError("run_study(request): give every option in the StudyRequest")
    started = time.monotonic()
    study = request.study
    if study.cycle_order == "shuffled" and study.seed is None:
        # Record the seed (in study.yaml) so the order can be reproduced.
        study = study.model_copy(update={"seed": random.SystemRandom().randrange(2**31)})
    experiments = expand_study(study)
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(request.force_kill.current())
        results = stack.enter_context(ResultsDir.open(request.results_dir, resume=request.resume))
        placed, dispatcher = await _place(stack, study, experiments, results, request)
        if request.reap_orphans:
            await placed.placement.sweep(placed.request, study_over=False)
        for path in remove_stale_secrets(results.exchange):
            # A killed run's kept exchange dirs: plaintext secrets must not stay there.
            log.warning("stale_secrets_removed", path=str(path))
        done = results.done_keys(study, experiments) if request.resume else set()
        todo = [e for e in experiments if e.key not in done]
        _write_study(results, study, placed, len(experiments))
        journal = results.start()
        stack.callback(dispatcher.subscribe(_journalling(journal)))
        skipped = len(experiments) - len(todo)
        _journal_start(journal, study, placed, len(experiments), skipped, request.resume)
        devices = placed.placement.telemetry_devices()
        sampler = start_telemetry(study, devices, results.path, reader=request.telemetry_reader)
        if sampler is not None:
            # Bounded (the thread wakes every interval); the last samples are written.
            stack.callback(sampler.stop, timeout=2.0)
        run = _StudyRun(
            study,
            placed,
            dispatcher,
            results,
            reap_orphans=request.reap_orphans,
            planned=len(experiments),
            done=done,
            skipped=skipped,
            sampler=sampler,
        )
        await run.all(todo)
        return run.finish(started=started)


def _journal_start(
    journal: Journal, study: Study, placed: _Placed, total: int, skipped: int, resume: bool
) -> None:
    journal.write(
        "study_started",
        sync=True,
        name=study.name,
        total=total,
        todo=total - skipped,
        skipped=skipped,
        resume=resume,
        runner=placed.runner_name,
        pid=os.getpid(),
        session=_labels.SESSION_ID,
        placement=study.placement,
        **placed.facts,
    )


class _StudyRun:
    """Every experiment through the placement, cycle by cycle; a record as each ends.

    When the Docker daemon stays hung past the retry budget, `stopped` says why and
    the rest is left for --resume.
    """

    def __init__(
        self,
        study: Study,
        placed: _Placed,
        dispatcher: Dispatcher,
        results: ResultsDir,
        *,
        reap_orphans: bool,
        planned: int,
        done: set[str],
        skipped: int,
        sampler: TelemetrySampler | None,
    ) -> None:
        self.study = study
        self.placed = placed
        self.dispatcher = dispatcher
        self.results = results
        self.reap_orphans = reap_orphans
        self.in_flight: set[str] = set()
        self.records: list[RunRecord] = []
        self.stopped: str | None = None
        self.stopped_fix: str | None = None
        self._stop_scope = anyio.CancelScope()
        #: Keys that had succeeded before this run (resume), and how many were skipped.
        self.done = done
        self.skipped = skipped
        #: Experiments planned so far (an adaptive study adds cycles as it goes).
        self.planned = planned
        self.unresolved: list[Unresolved] = []
        #: Adaptive: each config's cycles, and where their next ones are started.
        self.chains: CycleChains | None = None
        self._more: anyio.abc.TaskGroup | None = None
        self.sampler = sampler
        spec = study.adaptive
        self.history = CycleHistory(spec.until.field) if spec is not None else None
        if self.history is not None:
            # A resumed adaptive study decides on every cycle already on record.
            for payload in iter_records(results.path):
                self.history.add(payload)

    async def all(self, todo: list[Experiment]) -> None:
        """Run `todo`; the journal says `interrupted` or `crashed` if it does not end."""
        try:
            try:
                with self._stop_scope:
                    await self._cycles(todo)
            finally:
                if self.reap_orphans:
                    # Every experiment has its final record (or was cancelled and
                    # waited for): whatever container of this study is left on a
                    # node is abandoned, e.g. by a worker of a node that left.
                    with anyio.move_on_after(Placement.STUDY_SWEEP_S, shield=True):
                        await self.placed.placement.sweep(self.placed.request, study_over=True)
        except BaseException as exc:
            interrupted = isinstance(exc, anyio.get_cancelled_exc_class() | KeyboardInterrupt)
            self.results.journal.write(
                "interrupted" if interrupted else "crashed",
                sync=True,
                in_flight=sorted(self.in_flight),
                error=repr(exc)[:500],
            )
            raise

    def finish(self, *, started: float) -> StudySummary:
        """The summary, written to summary.json and journalled as `study_finished`."""
        records = self.records
        summary = StudySummary(
            name=self.study.name,
            results_dir=str(self.results.path),
            total=self.planned,
            succeeded=sum(r.status == "succeeded" for r in records),
            failed=sum(r.status == "failed" for r in records),
            errored=sum(r.status in {"error", "cancelled"} for r in records),
            skipped=self.skipped,
            stopped=self.stopped,
            stopped_fix=self.stopped_fix,
            duration_s=round(time.monotonic() - started, 3),
            runner=self.placed.runner_name,
            records=records,
            unresolved=self.unresolved,
            telemetry=self._telemetry_facts(),
        )
        for item in self.unresolved:
            log.warning(
                "config_unresolved",
                config_hash=item.config_hash,
                field=item.field,
                cycles=item.cycles,
                rel_ci95=item.rel_ci95,
                reason=item.reason,
            )
        self.results.write_json("summary.json", summary.model_dump(mode="json"))
        fields = summary.model_dump(mode="json", exclude={"name"})
        self.results.journal.write("study_finished", sync=True, **fields)
        return summary

    def _telemetry_facts(self) -> dict[str, Any] | None:
        if self.sampler is None:
            return None
        path = self.sampler.path
        return {"file": path.name if path else None, **self.sampler.cost()}

    async def _cycles(self, todo: list[Experiment]) -> None:
        study = self.study
        groups: list[list[Experiment]] = [todo]
        if study.cycle_gap_s > 0 and study.min_cycles > 1:
            groups = [[e for e in todo if e.cycle == c] for c in range(1, study.min_cycles + 1)]
        spec = study.adaptive
        if self.history is None or spec is None:
            for index, group in enumerate(groups):
                await self._group(group, gap=index > 0)
            return
        # Adaptive: each config goes on as its own cycles end (no round waits for all).
        again = self._resumed_cycles(self.history, spec.min)
        self.chains = CycleChains.start(self.history, spec, unique_configs(study))
        async with anyio.create_task_group() as more:
            self._more = more
            for exp in again:
                more.start_soon(self.one, exp)
            for config_hash in self.chains.configs:
                self._advance(config_hash)  # resumed configs whose cycles are all on record
            for index, group in enumerate(groups):
                await self._group(group, gap=index > 0)
        self._more = None
        self.unresolved = self.chains.unresolved()

    def _resumed_cycles(self, history: CycleHistory, min_cycles: int) -> list[Experiment]:
        """Cycles past `min` on record (resume): counted, and the failed ones to run again."""
        again = []
        for config_hash, config in unique_configs(self.study):
            for cycle in sorted(c for c in history.cycles(config_hash) if c > min_cycles):
                (exp,) = cycle_experiments(self.study, [(config_hash, config)], cycle)
                self.planned += 1
                if exp.key in self.done:
                    self.skipped += 1
                else:
                    history.forget(config_hash, cycle)
                    again.append(exp)
        return again

    def _speculate(self) -> bool:
        """Whether to ask for a config's next cycle before it has decided: prestart is
        on and fewer GPUs' worth of experiments are in flight than could be prepared."""
        placement = self.placed.placement
        pool = getattr(placement, "pool", None)
        if not getattr(placement, "prestart", False) or pool is None or not pool.size:
            return False
        ahead = 1 + int(getattr(pool, "prestart_depth", 1))
        return len(self.in_flight) < ahead * int(pool.size)

    def _advance(self, config_hash: str) -> None:
        """Decide for this config now if it can, and start what it asks for."""
        if self.chains is None or self._more is None:
            return
        step = self.chains.step(config_hash, speculate=self._speculate())
        if step.decision is not None:
            self.results.journal.write(
                "cycle_decided",
                sync=True,
                config_hash=config_hash,
                cycles=step.cycles_run,
                verdict=step.decision.verdict,
                reason=step.decision.reason,
                n=step.decision.stats.n,
                mean=step.decision.stats.mean,
                rel_ci95=step.decision.stats.rel_ci95,
            )
        config = self.chains.configs[config_hash]
        for cycle in step.request:
            (exp,) = cycle_experiments(self.study, [(config_hash, config)], cycle)
            self.planned += 1
            if exp.key in self.done:
                self.skipped += 1
                continue
            if step.speculative:
                self.results.journal.write("cycle_ahead", key=exp.key, cycle=cycle)
            self._more.start_soon(self._one_after_gap, exp)

    async def _one_after_gap(self, exp: Experiment) -> None:
        if self.study.cycle_gap_s:
            await anyio.sleep(self.study.cycle_gap_s)
        await self.one(exp)

    async def _group(self, group: list[Experiment], *, gap: bool) -> None:
        if gap and self.study.cycle_gap_s:
            self.results.journal.write("cycle_gap", seconds=self.study.cycle_gap_s)
            await anyio.sleep(self.study.cycle_gap_s)
        workers = 2 * self.dispatcher.parallelism()
        async with contextlib.aclosing(fan_out(group, self.one, workers=workers)) as done:
            async for _ in done:
                pass  # each record was written by the task that ran it

    async def one(self, exp: Experiment) -> RunRecord:
        """Run one experiment and write its record the moment it ends."""
        self.in_flight.add(exp.key)
        tags = {"key": exp.key, "cycle": exp.cycle}
        record = await self.dispatcher.run(exp.config, gpus=exp.gpu_count, tags=tags)
        # Written by the task that ran it: a cancel or crash right after loses
        # nothing that finished.
        extra: dict[str, Any] = {}
        # From this host's sampler, or the samples taken where the attempt ran.
        block = await record_energy(self.sampler, record, self.study.measure, self.results.path)
        if block is not None:
            extra["telemetry"] = block
        payload = self.results.record(exp, record, extra)
        if self.history is not None:
            self.history.add(payload)
            self.in_flight.discard(exp.key)
            self._advance(exp.config_hash)
        # The summary keeps the record, not the exception (its frames) nor the
        # validated outcome object beside its JSON form.
        self.records.append(
            record.model_copy(update={"outcome": None, "exception": None, "node_telemetry": None})
        )
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
        self.stopped_fix = fix
        log.error("study_stopped", reason=reason, fix=fix)
        self._stop_scope.cancel()


def _journalling(journal: Journal) -> Callable[[Event], None]:
    """A subscriber of the dispatcher's events: starts and retries go to the journal."""

    def handle(event: Event) -> None:
        if isinstance(event, ExperimentStarted):
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
        elif isinstance(event, ExperimentRetried):
            journal.write(
                "retried",
                key=event.tags.get("key"),
                attempt=event.attempt,
                error=event.error,
                delay_s=event.delay_s,
            )

    return handle


def _write_study(results: ResultsDir, study: Study, placed: _Placed, total: int) -> None:
    """study.json (the study as resolved, and where it runs) and study.yaml beside it."""
    # By alias: the keys the study file uses (`gpus:`), so study.yaml loads as a study.
    dump = study.model_dump(mode="json", by_alias=True)
    results.write_json(
        "study.json",
        {
            "study": dump,
            "runner": placed.runner_name,
            "runner_source": placed.runner_source,
            "placement": study.placement,
            **placed.facts,
            "experiments": total,
        },
    )
    results.write_text("study.yaml", yaml.safe_dump(dump, sort_keys=False))


async def _closed(dispatcher: Dispatcher, bound_s: float) -> None:
    """Close the dispatcher, and with it the placement and its runner: shielded, and
    within the placement's own bound for stopping (`Placement.stop_bound_s`)."""
    with anyio.move_on_after(bound_s, shield=True):
        await dispatcher.aclose()


async def _place(
    stack: contextlib.AsyncExitStack,
    study: Study,
    experiments: list[Experiment],
    results: ResultsDir,
    request: StudyRequest,
) -> tuple[_Placed, Dispatcher]:
    """The study's placement, built from one typed request, handed to the dispatcher
    (closed by `stack` from then on), and prepared (checked)."""
    cls = placement_class(study.placement)
    if (request.runner is not None or request.pool is not None) and not cls.on_this_host:
        raise ConfigError(
            f"placement {study.placement!r} builds its runners on each host: runner= and "
            "pool= cannot be used with it",
            fix_suggestion="Drop runner=/pool= (choose with runner_value=), or run on "
            "this host (placement: local).",
        )
    spec: RunnerSpec | None = None
    if request.runner is None:
        # Where attempts run here, `auto` is decided now; elsewhere, on each host.
        choose = resolve_runner if cls.on_this_host else cluster_runner_spec
        spec = request.runner_spec or choose(request.runner_value, study)
    wanted = _request(study, experiments, results, spec, request)
    settings = study.placement_settings()
    placement = cls.for_study(wanted, settings)
    dispatcher = Dispatcher(
        placement=placement,
        max_concurrency=request.max_concurrency or study.max_concurrency,
        retries=request.retry_policy or RetryPolicy(max_attempts=study.retries + 1),
        on_event=request.on_event,
    )
    stack.push_async_callback(_closed, dispatcher, cls.stop_bound_s(study.stop_grace_s, settings))
    await placement.prepare(wanted)
    name = spec.kind if spec else (placement.runner_type or "custom")
    source = spec.source if spec else "explicit"
    return _Placed(placement, wanted, name, source, dict(placement.describe())), dispatcher


def _request(
    study: Study,
    experiments: list[Experiment],
    results: ResultsDir,
    spec: RunnerSpec | None,
    request: StudyRequest,
) -> PlacementRequest:
    """What the study asks of its placement, as typed values."""
    runner, study_dir = request.runner, request.study_dir or Path.cwd()
    labels = {_labels.LABEL_RESULTS_DIR: str(results.path)}
    factory: HostRunnerFactory
    needs = HostNeeds()
    check_here = reap_here = None
    if spec is None:
        given = runner

        def factory(host: HostContext) -> Runner:
            assert given is not None
            return given
    else:
        # One experiment per backend is all the runner needs (and all a node is sent).
        per_backend = {str(e.config.get(study.image_field)): e for e in experiments}
        factory = StudyRunnerFactory(
            study,
            spec,
            study_dir.resolve(),
            labels,
            tuple(per_backend.values()) if study.images else (),
            results.exchange,
        )
        images, paths = cluster_requirements(study, spec, experiments, study_dir)
        needs = HostNeeds(tuple(images), tuple(paths))
        check_here = functools.partial(
            check_function_importable, study, spec, experiments, study_dir=study_dir
        )
    # A runner given ready-made is known by its runner_type (a custom one by no kind);
    # `auto` names no kind yet (on a cluster each host decides, and the placement reaps).
    kind = find_runner_kind(spec.kind if spec else str(getattr(runner, "runner_type", "")))
    if kind is not None and kind.reapable:
        # The kind reaps its own leftovers, on its own engine.
        reap_here = functools.partial(
            kind.reap,
            results_dir=results.path,
            logs_dir=results.path / "orphans",
            api_deadlines=study.docker_deadlines,
        )
    return PlacementRequest(
        runner_factory=factory,
        runner_kind=spec.kind if spec else "custom",
        max_gpu_count=max((e.gpu_count for e in experiments), default=0),
        results_dir=results.path,
        cooldown_s=study.experiment_gap_s,
        settle=study.settle,
        host_gpus=host_gpus(study),
        pool=request.pool,
        prestart=study.prestart,
        prestart_memory_reserve=parse_size(study.prestart_memory_reserve)
        if study.prestart_memory_reserve is not None
        else None,
        stop_grace_s=study.stop_grace_s,
        host_needs=needs,
        study_name=study.name,
        timeout_s=study.timeout_s,
        check_here=check_here,
        reap_here=reap_here,
        isolation=study.prepare_during_measurement,
        prestart_depth=study.prestart_depth,
        cpus_per_gpu=study.cpus_per_gpu,
        force_kill=request.force_kill,
        telemetry=node_telemetry(study),
    )
