"""`llem-dispatch run`: a study with live progress, a summary, and exit codes."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from llem_dispatch import _logging
from llem_dispatch._docker import docker_available
from llem_dispatch.cli.app import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    app,
    fail_usage,
    make_console,
)
from llem_dispatch.cli.progress import LiveDisplay, ProgressState, resumed_count
from llem_dispatch.dispatch import (
    Event,
)
from llem_dispatch.errors import LlemError
from llem_dispatch.gpu import GpuPool
from llem_dispatch.study import (
    Study,
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


def _parse_gpus(value: str | None) -> list[str] | str | None:
    if value is None:
        return None
    if value.strip() == "auto":
        return "auto"
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if not ids:
        raise fail_usage(f"--gpus {value!r} names no GPU", "Use --gpus 0,1 or --gpus auto.")
    return ids


def _print_dry_run(
    study: Study, study_path: Path, runner_value: str | None, virtual: bool, console: Console
) -> None:
    from llem_dispatch._exchange import ExchangeDir
    from llem_dispatch.runners.docker import DockerRunner
    from llem_dispatch.runners.local import LocalRunner

    experiments = expand_study(study)
    table = Table(title=f"{study.name}: {len(experiments)} experiments (dry run)")
    for column in ("#", "hash", "cycle", "gpus", "params"):
        table.add_column(column)
    for index, exp in enumerate(experiments, 1):
        table.add_row(
            str(index),
            exp.config_hash,
            str(exp.cycle),
            str(exp.gpus),
            json.dumps(exp.config, sort_keys=True),
        )
    console.print(table)
    spec = resolve_runner(runner_value, study)
    runner = make_runner(
        study, spec, study_dir=study_path.parent, experiments=experiments, virtual=virtual
    )
    console.print(f"runner: {spec.kind} (chosen by: {spec.source})")
    if not experiments:
        return
    first = experiments[0]
    placeholder = ExchangeDir(Path("/tmp/llem-XXXXXXXX"), first.config_hash)
    gpu_ids = [str(i) for i in range(first.gpus)]
    if isinstance(runner, DockerRunner):
        body = runner.container_spec(placeholder, gpu_ids, config_hash=first.config_hash)
        console.print("container spec of the first experiment (Engine API create body):")
        console.print_json(json.dumps(body))
    elif isinstance(runner, LocalRunner):
        console.print("process of the first experiment:")
        console.print_json(
            json.dumps(
                {
                    "argv": runner.command,
                    "cwd": str(runner.cwd),
                    "env": {
                        k: v
                        for k, v in runner.process_env(placeholder, gpu_ids).items()
                        if k.startswith(("LLEM_", "CUDA_"))
                    },
                }
            )
        )


@app.command()
def run(
    study_file: Annotated[Path, typer.Argument(help="The study YAML file.")],
    results: Annotated[
        Path | None,
        typer.Option("--results", help="Results dir (default: ./llem-results/<study name>)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue a results dir: skip what succeeded.")
    ] = False,
    gpus: Annotated[str | None, typer.Option(help="GPU ids '0,1,2' or 'auto' (NVML).")] = None,
    virtual_gpus: Annotated[
        int | None,
        typer.Option(
            "--virtual-gpus", min=1, help="Schedule on N virtual GPUs (no device requests)."
        ),
    ] = None,
    runner: Annotated[str | None, typer.Option(help="local | docker | docker:IMAGE")] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray",
            metavar="ADDRESS",
            help="Run on a Ray cluster: auto, HOST:6379 or ray://HOST:10001 (overrides the "
            "study's `cluster:`).",
        ),
    ] = None,
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
    overrides: dict[str, Any] = {}
    if timeout is not None:
        if timeout <= 0:
            raise fail_usage(f"--timeout must be positive, got {timeout}")
        overrides["timeout_s"] = timeout
    try:
        study = load_study(study_file, overrides=overrides)
        cluster = ray_address or study.cluster
        pool: GpuPool | None = None
        experiments = expand_study(study)
        if cluster:
            if gpus is not None or virtual_gpus is not None:
                raise fail_usage(
                    "--gpus/--virtual-gpus choose GPUs of this host; on a Ray cluster Ray "
                    "assigns them",
                    "Drop them; set each node's GPUs with `ray start --num-gpus N`.",
                )
        else:
            pool = build_pool(study, gpus=_parse_gpus(gpus), virtual_gpus=virtual_gpus)
            pool.check_request(max((e.gpus for e in experiments), default=0))
        if dry_run:
            _print_dry_run(study, study_file, runner, pool.virtual if pool else False, console)
            raise typer.Exit(EXIT_OK)
        if cluster:
            # Each node decides `auto` for itself; images are built here when this
            # host has a daemon (other nodes need the image too: see the README).
            spec = cluster_runner_spec(runner, study)
            build_here = spec.kind == "docker" and docker_available()
        else:
            spec = resolve_runner(runner, study)
            build_here = spec.kind == "docker"
        if build_here:
            for image in study_images(study, spec, experiments):
                ensure_image(
                    study,
                    image,
                    study_dir=study_file.parent,
                    output=lambda line: console.print(line, markup=False),
                )
    except LlemError as exc:
        raise fail_usage(exc.message, exc.fix_suggestion) from exc
    results_dir = results or Path("llem-results") / study.name
    runner_value = (
        f"{spec.kind}:{spec.image}" if spec.kind == "docker" and spec.image else spec.kind
    )
    os.environ.setdefault("LLEM_RUNNER_SOURCE", spec.source)
    state = ProgressState(
        total=len(experiments),
        skipped=resumed_count(experiments, results_dir) if resume else 0,
        gpu_ids=list(pool.devices) if pool else [],
    )
    interactive = console.is_terminal and not plain and not json_logs
    display = LiveDisplay(state)
    summary_box: list[StudySummary] = []

    def on_event(event: Event) -> None:
        line = state.apply(event)
        if line and not interactive:
            console.print(line, markup=False)

    async def main_task() -> None:
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    count = 0
                    async for signum in signals:
                        count += 1
                        if count == 1:
                            console.print(
                                f"[yellow]{signal.Signals(signum).name}: stopping "
                                "running experiments (again to force)...[/]"
                            )
                            _logging_force(False)
                            study_scope.cancel()
                        else:
                            _logging_force(True)
                            console.print("[red]forcing: killing containers now[/]")

            tg.start_soon(watch_signals)
            with anyio.CancelScope() as study_scope:
                summary = await run_study(
                    study,
                    results_dir,
                    pool=pool,
                    resume=resume,
                    on_event=on_event,
                    max_concurrency=max_concurrency,
                    study_dir=study_file.parent,
                    runner_value=runner_value,
                    cluster=cluster,
                )
                summary_box.append(summary)
            tg.cancel_scope.cancel()

    started = time.monotonic()
    try:
        if interactive:
            with Live(display, console=console, refresh_per_second=8, transient=False):
                anyio.run(main_task)
        else:
            anyio.run(main_task)
    except (LlemError, BaseExceptionGroup) as exc:
        # run_study runs in a task group: its errors arrive wrapped in a group.
        error = _llem_error_in(exc)
        if error is None:
            raise
        raise fail_usage(error.message, error.fix_suggestion) from exc
    if not summary_box:
        console.print(
            f"[yellow]interrupted after {time.monotonic() - started:.1f}s; "
            f"records so far are in {results_dir}; continue with --resume[/]"
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    summary = summary_box[0]
    _print_summary(summary, console)
    raise typer.Exit(summary.exit_code)


def _llem_error_in(exc: BaseException) -> LlemError | None:
    """The LlemError in an exception (group), if that is all it holds."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, LlemError) else None


def _logging_force(force: bool) -> None:
    """Tell the runners' cancellation cleanup to skip the stop grace period."""
    from llem_dispatch.runners import set_force_kill

    if force:
        set_force_kill(True)


def _print_summary(summary: StudySummary, console: Console) -> None:
    console.print(
        f"[bold]{summary.name}[/]: {summary.succeeded} succeeded, {summary.failed} failed, "
        f"{summary.errored} errors, {summary.skipped} skipped (already done) of "
        f"{summary.total} in {summary.duration_s:.1f}s -> {summary.results_dir}"
    )
    bad = [r for r in summary.records if not r.ok]
    if not bad:
        return
    table = Table(title="failed experiments")
    for column in ("key", "error", "message", "fix", "exchange dir (kept)"):
        table.add_column(column, overflow="fold")
    for record in bad:
        if record.error is not None:
            kind, message, fix = (
                record.error.type,
                record.error.message,
                record.error.fix_suggestion or "",
            )
        elif record.failure is not None:
            kind, message, fix = (
                record.failure.type,
                record.failure.message,
                "The experiment reported this itself; see its traceback in the record.",
            )
        else:
            kind, message, fix = record.status, "", ""
        table.add_row(
            str(record.tags.get("key", record.config_hash)),
            kind,
            message[:300],
            fix,
            record.exchange_dir or "",
        )
    console.print(table)
