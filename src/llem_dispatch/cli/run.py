"""`llem-dispatch run`: a study with live progress, a summary, and exit codes."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llem_dispatch import _logging
from llem_dispatch._exchange import ExchangeDir
from llem_dispatch.cli.app import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EngineUrlOption,
    app,
    fail_usage,
    make_console,
    use_engine_url,
)
from llem_dispatch.cli.progress import LiveDisplay, ProgressState, resumed_count
from llem_dispatch.dispatch import Event, RunRecord, placement_class
from llem_dispatch.dispatch.registry import CLUSTER_ADDRESS
from llem_dispatch.errors import LlemError
from llem_dispatch.gpu import GpuPool
from llem_dispatch.runners import ForceKill, Runner
from llem_dispatch.runners.kinds import RunnerKind
from llem_dispatch.runners.protocol import GpuCheckingRunner
from llem_dispatch.study import (
    Experiment,
    RunnerSpec,
    Study,
    StudyRequest,
    StudySummary,
    build_pool,
    cluster_runner_spec,
    ensure_image,
    expand_study,
    load_study,
    make_runner,
    resolve_runner,
    run_study,
    study_images,
)

__all__ = ["run"]


def _parse_gpus(value: str | None) -> list[str] | Literal["auto"] | None:
    if value is None:
        return None
    if value.strip() == "auto":
        return "auto"
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if not ids:
        raise fail_usage(f"--gpus {value!r} names no GPU", "Use --gpus 0,1 or --gpus auto.")
    return ids


def _print_dry_run(
    study: Study,
    study_path: Path,
    runner_value: str | None,
    pool: GpuPool | None,
    console: Console,
) -> None:
    """The plan: every experiment, the runner and why, the first experiment's container."""
    experiments = expand_study(study)
    table = Table(title=f"{study.name}: {len(experiments)} experiments (dry run)")
    for column in ("#", "hash", "cycle", "gpus", "params"):
        table.add_column(column)
    for index, exp in enumerate(experiments, 1):
        table.add_row(
            str(index),
            exp.config_hash,
            str(exp.cycle),
            str(exp.gpu_count),
            json.dumps(exp.config, sort_keys=True),
        )
    console.print(table)
    if (adaptive := study.adaptive) is not None:
        configs = len(experiments) // adaptive.min
        console.print(
            f"adaptive cycles: {adaptive.min} each, then one at a time up to {adaptive.max} "
            f"({configs * adaptive.max} at most) while the 95% CI of "
            f"{adaptive.until.field} is over {adaptive.until.rel_ci95:g} of its mean"
        )
    virtual = pool.virtual if pool else False
    spec = resolve_runner(runner_value, study)
    runner = make_runner(
        study, spec, study_dir=study_path.parent, experiments=experiments, virtual=virtual
    )
    console.print(f"runner: {spec.kind} (chosen by: {spec.source})")
    console.print(_gpu_policy(study, virtual))
    # The GPUs as the runner is handed them (UUIDs where known), asked for as a run would.
    handed = list(pool.handed(pool.devices)) if pool else []
    if handed and isinstance(runner, GpuCheckingRunner):
        anyio.run(runner.check_gpus, handed)
    if experiments:
        first = experiments[0]
        ids = handed[: first.gpu_count] or [str(i) for i in range(first.gpu_count)]
        _print_first_experiment(spec.runner_kind(), runner, first, ids, console)


def _gpu_policy(study: Study, virtual: bool) -> str:
    """How GPUs are handed on: cooldown, thermal gate, residual-memory hold-back."""
    if virtual:
        return f"GPUs: virtual ids, cooldown {study.experiment_gap_s:g}s"
    parts = [f"cooldown {study.experiment_gap_s:g}s"]
    if study.settle is not None:
        parts.append(
            f"thermal gate (within {study.settle.temperature_c:g} C / "
            f"{study.settle.power_w:g} W of idle for {study.settle.hold_s:g}s, "
            f"{study.settle.min_s:g}-{study.settle.max_s:g}s)"
        )
    held = study.residual_memory_mb
    parts.append(
        f"held back while over {held:g} MiB of memory is in use"
        if held is not None
        else "no residual-memory check"
    )
    return "GPUs: " + ", ".join(parts)


def _print_first_experiment(
    kind: RunnerKind, runner: Runner, first: Experiment, gpu_ids: list[str], console: Console
) -> None:
    """What the runner would start for `first`, as its kind describes it (a container
    body, a process, a file image's command line)."""
    placeholder = ExchangeDir(Path("/tmp/llem-XXXXXXXX"), first.config_hash)
    described = kind.describe_launch(runner, placeholder, gpu_ids, config_hash=first.config_hash)
    if described is not None:
        title, body = described
        console.print(title)
        console.print_json(json.dumps(body))


_ResultsOption = Annotated[
    Path | None,
    typer.Option("--results", help="Results dir (default: ./llem-results/<study name>)."),
]
_VirtualGpusOption = Annotated[
    int | None,
    typer.Option("--virtual-gpus", min=1, help="Schedule on N virtual GPUs (no device requests)."),
]
_RayOption = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        help="Run on a Ray cluster: auto, HOST:6379 or ray://HOST:10001 (overrides the "
        "study's `placement:` and the address in its `ray:` / `cluster:`).",
    ),
]


@app.command()
def run(
    study_file: Annotated[Path, typer.Argument(help="The study YAML file.")],
    results: _ResultsOption = None,
    resume: Annotated[
        bool, typer.Option(help="Continue a results dir: skip what succeeded.")
    ] = False,
    gpus: Annotated[str | None, typer.Option(help="GPU ids '0,1,2' or 'auto' (NVML).")] = None,
    virtual_gpus: _VirtualGpusOption = None,
    runner: Annotated[
        str | None,
        typer.Option(help="A runner kind: local | docker | docker:IMAGE | a registered one | auto"),
    ] = None,
    ray_address: _RayOption = None,
    engine_url: EngineUrlOption = None,
    max_concurrency: Annotated[int | None, typer.Option(min=1)] = None,
    timeout: Annotated[float | None, typer.Option(help="Per-experiment timeout, seconds.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; run nothing.")
    ] = False,
    json_logs: Annotated[
        bool, typer.Option("--json-logs", help="structlog JSON on stderr.")
    ] = False,
    plain: Annotated[bool, typer.Option(help="Line-by-line output even on a terminal.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every container.")] = False,
) -> None:
    """Run every experiment of STUDY_FILE and write records to the results dir."""
    _logging.configure_logging(
        json_logs=json_logs, level=logging.INFO if verbose or json_logs else logging.WARNING
    )
    console = make_console()
    use_engine_url(engine_url)
    try:
        plan = _load_plan(study_file, timeout, gpus, virtual_gpus, ray_address)
        if dry_run:
            _print_dry_run(plan.study, study_file, runner, plan.pool, console)
            raise typer.Exit(EXIT_OK)
        spec = _choose_runner_and_build(plan, runner, study_file, console)
    except LlemError as exc:
        raise fail_usage(exc.message, exc.fix_suggestion) from exc
    results_dir = results or Path("llem-results") / plan.study.name
    request = StudyRequest(
        plan.study,
        results_dir,
        pool=plan.pool,
        resume=resume,
        max_concurrency=max_concurrency,
        study_dir=study_file.parent,
        runner_spec=spec,
    )
    interactive = console.is_terminal and not plain and not json_logs
    started = time.monotonic()
    skipped = resumed_count(plan.experiments, results_dir) if resume else 0
    summary = _run_with_progress(plan, request, console, interactive=interactive, skipped=skipped)
    if summary is None:
        console.print(
            Text(
                f"interrupted after {time.monotonic() - started:.1f}s; "
                f"records so far are in {results_dir}; continue with --resume",
                style="yellow",
            )
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    _print_summary(summary, console)
    raise typer.Exit(summary.exit_code)


@dataclass(frozen=True, slots=True)
class _Plan:
    """The loaded study and where its experiments will run, before anything runs."""

    study: Study
    experiments: list[Experiment]
    #: This host's GPUs; None where the placement assigns GPUs elsewhere (a Ray cluster).
    pool: GpuPool | None

    @property
    def on_this_host(self) -> bool:
        """Whether experiments run here (the runner is then chosen and built here)."""
        return self.pool is not None


def _load_plan(
    study_file: Path,
    timeout: float | None,
    gpus: str | None,
    virtual_gpus: int | None,
    ray_address: str | None,
) -> _Plan:
    """Load and expand the study with the command's overrides; check its GPU requests."""
    # Checked by the study's schema, as if the file said it (one rule, one message).
    overrides: dict[str, Any] = {"timeout_s": timeout} if timeout is not None else {}
    study = load_study(study_file, overrides=overrides)
    if ray_address:
        study = study.on_placement(CLUSTER_ADDRESS.placement, CLUSTER_ADDRESS.settings(ray_address))
    experiments = expand_study(study)
    placement = placement_class(study.placement)
    if not placement.on_this_host:
        if gpus is not None or virtual_gpus is not None:
            why, fix = placement.gpus_assigned_elsewhere
            raise fail_usage(f"--gpus/--virtual-gpus choose GPUs of this host; {why}", fix)
        return _Plan(study, experiments, None)
    pool = build_pool(study, gpu_ids=_parse_gpus(gpus), virtual_gpus=virtual_gpus)
    pool.check_request(max((e.gpu_count for e in experiments), default=0))
    return _Plan(study, experiments, pool)


def _choose_runner_and_build(
    plan: _Plan, runner: str | None, study_file: Path, console: Console
) -> RunnerSpec:
    """The runner to use; builds the study's missing images where this host runs them."""
    if not plan.on_this_host:
        # Each node decides `auto` for itself; images are built here when this
        # host has a daemon (other nodes need the image too: see the README).
        spec = cluster_runner_spec(runner, plan.study)
        kind = None if spec.auto else spec.runner_kind()
        build_here = kind is not None and kind.needs_image and kind.available()
    else:
        spec = resolve_runner(runner, plan.study)
        build_here = spec.runner_kind().needs_image
    if build_here:
        for image in study_images(plan.study, spec, plan.experiments):
            ensure_image(
                plan.study,
                image,
                kind=spec.runner_kind(),
                study_dir=study_file.parent,
                output=console.print,
            )
    return spec


def _run_with_progress(
    plan: _Plan,
    request: StudyRequest,
    console: Console,
    *,
    interactive: bool,
    skipped: int = 0,
) -> StudySummary | None:
    """Run the study, shown live on a terminal or line by line; None when interrupted.

    `skipped` is what a --resume finds done already, so the bar can reach the total.
    """
    gpu_ids = list(plan.pool.devices) if plan.pool else []
    # Adaptive cycles: the most it can take (configs that converge early end below it).
    total = len(plan.experiments) // plan.study.min_cycles * plan.study.max_cycles
    state = ProgressState(total=total, skipped=skipped, gpu_ids=gpu_ids)

    def on_event(event: Event) -> None:
        line = state.apply(event)
        if line and not interactive:
            console.print(line)

    with_events = functools.partial(run_study, dataclasses.replace(request, on_event=on_event))
    study = plan.study
    bound_s = placement_class(study.placement).stop_bound_s(
        study.stop_grace_s, study.placement_settings()
    )
    main = functools.partial(
        _run_until_signalled, with_events, console, bound_s, request.force_kill
    )
    try:
        if interactive:
            with Live(LiveDisplay(state), console=console, refresh_per_second=8, transient=False):
                return anyio.run(main)
        return anyio.run(main)
    except (LlemError, BaseExceptionGroup) as exc:
        # run_study runs in a task group: its errors arrive wrapped in a group.
        error = _llem_error_in(exc)
        if error is None:
            raise
        raise fail_usage(error.message, error.fix_suggestion) from exc


async def _run_until_signalled(
    study_run: Callable[[], Awaitable[StudySummary]],
    console: Console,
    bound_s: float,
    force_kill: ForceKill,
) -> StudySummary | None:
    """Run the study beside a signal watcher; None when a signal stopped it."""
    summary: StudySummary | None = None
    study_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, study_scope, console, bound_s, force_kill)
        with study_scope:
            summary = await study_run()
        tg.cancel_scope.cancel()
    return summary


#: After the first signal the process ends within its placement's stop bound plus
#: this, whatever the engine does (a hung daemon never answers the clean-up calls).
EXIT_SLACK_S = 1.0


async def _watch_signals(
    study_scope: anyio.CancelScope, console: Console, bound_s: float, force_kill: ForceKill
) -> None:
    """First SIGINT/SIGTERM: stop the study (grace periods kept); any later one: force kills
    (sets the study's `force_kill`, which its placement and runners act on at once).

    `bound_s` is how long the placement's clean-up may take (`Placement.stop_bound_s`).
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        count = 0
        async for signum in signals:
            count += 1
            if count == 1:
                console.print(
                    Text(
                        f"{signal.Signals(signum).name}: stopping "
                        "running experiments (again to force)...",
                        style="yellow",
                    )
                )
                study_scope.cancel()
                _exit_by(bound_s + EXIT_SLACK_S, console)
            else:
                # The study's placement and runners skip the stop grace period now.
                force_kill.set()
                console.print(Text("forcing: killing running experiments now", style="red"))


def _exit_by(seconds: float, console: Console) -> None:
    """A last resort, in a thread (the event loop may be the thing waiting): exit 130."""

    def give_up() -> None:
        console.print(
            Text(
                f"clean-up did not finish within {seconds:g}s (its engine may be stuck): "
                "exiting now. Records so far are kept; once the engine answers, run "
                "`llem-dispatch reap` (containers), then --resume.",
                style="red",
            )
        )
        os._exit(EXIT_INTERRUPTED)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()


def _llem_error_in(exc: BaseException) -> LlemError | None:
    """The LlemError in an exception (group), if that is all it holds."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, LlemError) else None


def _print_summary(summary: StudySummary, console: Console) -> None:
    """The counts line, then a table of the failed experiments with their fixes."""
    console.print(
        Text.assemble(
            (summary.name, "bold"),
            f": {summary.succeeded} succeeded, {summary.failed} failed, "
            f"{summary.errored} errors, {summary.skipped} skipped (already done) of "
            f"{summary.total} in {summary.duration_s:.1f}s -> {summary.results_dir}",
        )
    )
    if summary.stopped:
        not_run = summary.total - summary.skipped - len(summary.records)
        console.print(
            Text.assemble(
                (f"stopped early, {not_run} experiment(s) not run:", "bold red"),
                f" {summary.stopped}. "
                f"{summary.stopped_fix or 'Bring its engine back'}; then run again with --resume.",
            )
        )
    for item in summary.unresolved:
        console.print(
            Text.assemble(
                ("unresolved:", "bold yellow"),
                f" {item.config_hash} {json.dumps(item.config, sort_keys=True)[:120]}: "
                f"{item.field} after {item.cycles} cycles: {item.reason}",
            )
        )
    bad = [r for r in summary.records if not r.ok]
    if not bad:
        return
    table = Table(title="failed experiments")
    for column in ("key", "error", "message", "fix", "exchange dir (kept)"):
        table.add_column(column, overflow="fold")
    for record in bad:
        kind, message, fix = _failure_columns(record)
        table.add_row(
            str(record.tags.get("key", record.config_hash)),
            kind,
            message[:300],
            fix,
            record.exchange_dir or "",
        )
    console.print(table)


def _failure_columns(record: RunRecord) -> tuple[str, str, str]:
    """A failed record's error type, message and fix, for the summary table."""
    if record.error is not None:
        return record.error.type, record.error.message, record.error.fix_suggestion or ""
    if record.failure is not None:
        return (
            record.failure.type,
            record.failure.message,
            "The experiment reported this itself; see its traceback in the record.",
        )
    return record.status, "", ""
