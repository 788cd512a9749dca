"""The `llem-dispatch` command: run a study with live progress, read results, doctor, reap.

Exit codes: 0 all succeeded, 1 some experiments failed, 2 bad usage or study
file, 130 interrupted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from llem_dispatch import _logging
from llem_dispatch.dispatcher import (
    Event,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentQueued,
    ExperimentRetried,
    ExperimentStarted,
    NodeInfo,
)
from llem_dispatch.errors import LlemError
from llem_dispatch.gpu import GpuPool
from llem_dispatch.study import (
    RunnerSpec,
    Study,
    StudySummary,
    build_pool,
    cluster_requirements,
    cluster_runner_spec,
    docker_available,
    ensure_image,
    expand_study,
    iter_records,
    load_study,
    make_runner,
    resolve_runner,
    run_study,
    study_images,
)

__all__ = ["app", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run GPU experiment sweeps, one ephemeral container per experiment.",
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Console-script entry point."""
    app()


@app.callback()
def _setup() -> None:
    """Quiet library logs by default; `run --verbose` / `--json-logs` turn them up."""
    _logging.configure_logging(level=logging.WARNING)


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _fail_usage(message: str, fix: str | None = None) -> typer.Exit:
    err = _console(stderr=True)
    err.print(f"[bold red]error:[/] {message}")
    if fix:
        err.print(f"[bold]fix:[/] {fix}")
    return typer.Exit(EXIT_USAGE)


# -- progress display ----------------------------------------------------------------


@dataclass
class _Slot:
    key: str
    started: float


def _slot_names(node: str | None, gpu_ids: Iterable[str]) -> list[str]:
    """Display names of GPUs: 'host:0' on a cluster, where ids repeat across nodes."""
    return [f"{node}:{gpu}" if node else gpu for gpu in gpu_ids]


@dataclass
class ProgressState:
    """What the live display shows; fed by dispatcher events."""

    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    running: dict[str, _Slot] = field(default_factory=dict)  # gpu id (or '-') -> slot
    cpu_running: dict[str, _Slot] = field(default_factory=dict)
    gpu_ids: list[str] = field(default_factory=list)
    recent_failures: list[str] = field(default_factory=list)

    @property
    def queued(self) -> int:
        return max(0, self.total - self.skipped - self.done - self.failed - self.in_flight)

    @property
    def in_flight(self) -> int:
        return len({s.key for s in self.running.values()}) + len(self.cpu_running)

    def apply(self, event: Event) -> str | None:
        """Update from one event; return a plain log line for non-terminal output."""
        now = time.monotonic()
        match event:
            case ExperimentStarted():
                key = str(event.tags.get("key", event.config_hash))
                slots = _slot_names(event.node, event.gpu_ids)
                if slots:
                    for slot in slots:
                        self.running[slot] = _Slot(key, now)
                else:
                    self.cpu_running[key] = _Slot(key, now)
                where = ",".join(slots) or "-"
                return f"started   {key} on GPU {where} (attempt {event.attempt})"
            case ExperimentFinished() | ExperimentFailed():
                record = event.record
                key = str(record.tags.get("key", record.config_hash))
                node = record.node.label if record.node is not None else None
                for slot in _slot_names(node, record.gpu_ids):
                    if slot in self.running and self.running[slot].key == key:
                        del self.running[slot]
                self.cpu_running.pop(key, None)
                if record.ok:
                    self.done += 1
                    return f"done      {key} in {record.duration_s or 0:.2f}s"
                self.failed += 1
                what = (
                    record.error.type
                    if record.error
                    else (record.failure.type if record.failure else record.status)
                )
                self.recent_failures = [*self.recent_failures[-2:], f"{key}: {what}"]
                return f"FAILED    {key}: {what}"
            case ExperimentRetried():
                key = str(event.tags.get("key", event.config_hash))
                return f"retry     {key} in {event.delay_s:.1f}s after {event.error}"
            case ExperimentQueued():
                return None
        return None


class LiveDisplay:
    """rich renderable: an overall bar with counts and ETA, then one line per GPU."""

    def __init__(self, state: ProgressState) -> None:
        self.state = state
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(
            "study", total=state.total, completed=state.skipped, counts=""
        )

    def __rich__(self) -> Group:
        s = self.state
        counts = (
            f"[green]done {s.done}[/] [red]failed {s.failed}[/] "
            f"[yellow]running {s.in_flight}[/] queued {s.queued}"
            + (f" skipped {s.skipped}" if s.skipped else "")
        )
        self.progress.update(self.task, completed=s.skipped + s.done + s.failed, counts=counts)
        table = Table.grid(padding=(0, 2))
        now = time.monotonic()
        # On a cluster the GPUs are only known once experiments land on them.
        for gpu in [*s.gpu_ids, *(k for k in s.running if k not in s.gpu_ids)]:
            slot = s.running.get(gpu)
            if slot is None:
                table.add_row(f"GPU {gpu}", Text("idle", style="dim"), "")
            else:
                table.add_row(f"GPU {gpu}", slot.key, f"{now - slot.started:6.1f}s")
        for key, slot in list(s.cpu_running.items())[:8]:
            table.add_row("CPU", key, f"{now - slot.started:6.1f}s")
        parts: list[Any] = [self.progress, table]
        for line in s.recent_failures:
            parts.append(Text(f"failed: {line}", style="red"))
        return Group(*parts)


# -- run -------------------------------------------------------------------------------


def _parse_gpus(value: str | None) -> list[str] | str | None:
    if value is None:
        return None
    if value.strip() == "auto":
        return "auto"
    ids = [v.strip() for v in value.split(",") if v.strip()]
    if not ids:
        raise _fail_usage(f"--gpus {value!r} names no GPU", "Use --gpus 0,1 or --gpus auto.")
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
    console = _console()
    overrides: dict[str, Any] = {}
    if timeout is not None:
        if timeout <= 0:
            raise _fail_usage(f"--timeout must be positive, got {timeout}")
        overrides["timeout_s"] = timeout
    try:
        study = load_study(study_file, overrides=overrides)
        cluster = ray_address or study.cluster
        pool: GpuPool | None = None
        experiments = expand_study(study)
        if cluster:
            if gpus is not None or virtual_gpus is not None:
                raise _fail_usage(
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
        raise _fail_usage(exc.message, exc.fix_suggestion) from exc
    results_dir = results or Path("llem-results") / study.name
    runner_value = (
        f"{spec.kind}:{spec.image}" if spec.kind == "docker" and spec.image else spec.kind
    )
    os.environ.setdefault("LLEM_RUNNER_SOURCE", spec.source)
    state = ProgressState(total=len(experiments), gpu_ids=list(pool.devices) if pool else [])
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
                state.skipped = 0
                anyio.run(main_task)
        else:
            anyio.run(main_task)
    except (LlemError, BaseExceptionGroup) as exc:
        # run_study runs in a task group: its errors arrive wrapped in a group.
        error = _llem_error_in(exc)
        if error is None:
            raise
        raise _fail_usage(error.message, error.fix_suggestion) from exc
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
    from llem_dispatch.runners._base import FORCE_KILL

    if force:
        FORCE_KILL.set()


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


# -- results ---------------------------------------------------------------------------


def record_row(data: dict[str, Any]) -> dict[str, Any]:
    """One flat row per record: params, status, timing, GPUs, scalar result fields."""
    row: dict[str, Any] = {
        "key": data.get("key"),
        "config_hash": data.get("config_hash"),
        "cycle": data.get("cycle"),
        "status": data.get("status"),
    }
    for k, v in sorted((data.get("config") or {}).items()):
        row[f"param.{k}"] = json.dumps(v) if isinstance(v, dict | list) else v
    started, ended = data.get("started_at"), data.get("ended_at")
    duration = None
    if started and ended:
        from datetime import datetime

        duration = (datetime.fromisoformat(ended) - datetime.fromisoformat(started)).total_seconds()
    row["duration_s"] = round(duration, 3) if duration is not None else None
    if node := data.get("node"):
        # Cluster runs: GPU ids are per node, so the node goes beside them.
        row["node"] = NodeInfo.model_validate(node).label
    row["gpu_ids"] = ",".join(data.get("gpu_ids") or [])
    row["image_digest"] = data.get("image_digest")
    row["attempts"] = data.get("attempts")
    result = data.get("result") or {}
    payload = result.get("data", result) if isinstance(result, dict) else {}
    for k, v in sorted(payload.items()):
        if isinstance(v, str | int | float | bool) or v is None:
            row[f"result.{k}"] = v
    error = data.get("error") or data.get("failure") or {}
    row["error"] = error.get("type") if isinstance(error, dict) else None
    row["exchange_dir"] = data.get("exchange_dir")
    return row


@app.command()
def results(
    results_dir: Annotated[Path, typer.Argument(help="A results dir written by `run`.")],
    fmt: Annotated[str, typer.Option("--format", help="table | csv | jsonl")] = "table",
) -> None:
    """One row per experiment: params, status, duration, GPU ids, key result fields."""
    if fmt not in {"table", "csv", "jsonl"}:
        raise _fail_usage(f"--format {fmt!r} is not one of table, csv, jsonl")
    if not (results_dir / "records").is_dir():
        raise _fail_usage(
            f"{results_dir} holds no records/ folder",
            "Point at a dir written by `llem-dispatch run`.",
        )
    rows = [record_row(r) for r in iter_records(results_dir)]
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    out = sys.stdout
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, default=str) + "\n")
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
        out.write(buffer.getvalue())
    else:
        table = Table(title=f"{results_dir}: {len(rows)} experiments")
        shown = [c for c in columns if c not in {"config_hash", "exchange_dir", "image_digest"}]
        for column in shown:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in shown))
        _console().print(table)


# -- reap ------------------------------------------------------------------------------


@app.command()
def reap(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List; remove nothing.")] = False,
    results_dir: Annotated[
        Path | None, typer.Option("--results", help="Only containers of this results dir.")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray", metavar="ADDRESS", help="Reap on every host of this Ray cluster."),
    ] = None,
) -> None:
    """Remove containers left by dispatchers that are gone (their logs are kept)."""
    from llem_dispatch.reap import reap as do_reap

    console = _console()
    if ray_address is not None:
        _reap_cluster(ray_address, results_dir, dry_run, console)
        return
    try:
        found = anyio.run(
            lambda: do_reap(
                results_dir=results_dir, dry_run=dry_run, logs_dir=Path("llem-orphan-logs")
            )
        )
    except LlemError as exc:
        raise _fail_usage(exc.message, exc.fix_suggestion) from exc
    if not found:
        console.print("no orphaned llem-dispatch containers")
        return
    table = Table(title=("would remove" if dry_run else "removed") + f" {len(found)} container(s)")
    for column in ("container", "config hash", "owner pid", "results dir", "log kept at"):
        table.add_column(column, overflow="fold")
    for item in found:
        table.add_row(
            item.container_id[:12],
            item.config_hash or "",
            item.owner_pid or "",
            item.results_dir or "",
            item.log_path or "",
        )
    console.print(table)


def _reap_cluster(address: str, results_dir: Path | None, dry_run: bool, console: Console) -> None:
    from llem_dispatch.cluster import sweep_cluster

    try:
        sweeps = anyio.run(
            lambda: sweep_cluster(
                address,
                results_dir=results_dir,
                dry_run=dry_run,
                logs_dir=Path("llem-orphan-logs").resolve(),
            )
        )
    except LlemError as exc:
        raise _fail_usage(exc.message, exc.fix_suggestion) from exc
    table = Table(title=("would remove" if dry_run else "removed") + " per host")
    for column in ("node", "container", "config hash", "owner pid", "log kept at"):
        table.add_column(column, overflow="fold")
    total = 0
    for sweep in sweeps:
        if sweep.skipped:
            table.add_row(sweep.node.label, "-", "", "", f"skipped: {sweep.skipped}")
        for item in sweep.reaped:
            total += 1
            table.add_row(
                sweep.node.label,
                str(item["container_id"])[:12],
                item["config_hash"] or "",
                item["owner_pid"] or "",
                item["log_path"] or "",
            )
    console.print(table)
    console.print(f"{len(sweeps)} host(s) swept, {total} orphaned container(s)")


# -- doctor ----------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    #: A failed optional check (no GPUs on a CPU host) warns instead of failing.
    optional: bool = False


def _cluster_checks(address: str, study_file: Path | None) -> list[Check]:
    """Per host of the cluster: Docker, and the study's images (or folder, run locally)."""
    from llem_dispatch.cluster import check_cluster

    images: list[str] = []
    folder: list[str] = []
    spec: RunnerSpec | None = None
    if study_file is not None:
        study = load_study(study_file)
        spec = cluster_runner_spec(None, study)
        images, folder = cluster_requirements(study, spec, expand_study(study), study_file.parent)
    gpus, found = anyio.run(lambda: check_cluster(address, images=images, paths=folder))
    summary = ", ".join(f"{node}: {n} GPU(s)" for node, n in sorted(gpus.items()))
    checks = [Check("Ray cluster", True, f"{len(gpus)} node(s): {summary}")]
    for node in found:
        where = f"{node.node.label} ({node.node.ip})"
        needs_docker = bool(images) and (spec is None or spec.kind == "docker")
        checks.append(
            Check(
                f"{where} Docker daemon",
                node.docker,
                "answers" if node.docker else "not reachable",
                "" if node.docker else "Start dockerd on that host.",
                optional=not needs_docker,
            )
        )
        if images and node.docker:
            checks.append(
                Check(
                    f"{where} images",
                    not node.missing_images,
                    "missing: " + ", ".join(node.missing_images)
                    if node.missing_images
                    else "all present: " + ", ".join(images),
                    "Build or pull them on that host." if node.missing_images else "",
                )
            )
        if folder:
            checks.append(
                Check(
                    f"{where} study folder",
                    not node.missing_paths,
                    folder[0] + (" missing" if node.missing_paths else " present"),
                    "Copy the study folder to the same path there." if node.missing_paths else "",
                    optional=spec is not None and spec.kind == "auto" and node.docker,
                )
            )
    return checks


def _doctor_checks(study_file: Path | None) -> list[Check]:
    import subprocess

    from llem_dispatch.gpu import GpuPool
    from llem_dispatch.study import docker_available

    checks: list[Check] = []
    up = docker_available()
    version = ""
    if up:
        proc = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        version = proc.stdout.strip() or "answers /_ping"
    checks.append(
        Check(
            "Docker daemon",
            up,
            version or "not reachable",
            "" if up else "Start dockerd (`sudo systemctl start docker`) or use --runner local.",
        )
    )
    if up:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{json .Runtimes}}"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        has_nvidia = "nvidia" in proc.stdout
        checks.append(
            Check(
                "NVIDIA container runtime",
                has_nvidia,
                "registered" if has_nvidia else "not registered",
                ""
                if has_nvidia
                else "Install the NVIDIA Container Toolkit for GPU "
                "passthrough; without it use --virtual-gpus.",
                optional=True,
            )
        )
    pool = GpuPool.detect()
    gpu_detail = ", ".join(f"{i}={pool.uuids.get(i, '?')}" for i in pool.devices) or "none"
    checks.append(
        Check(
            "GPUs (NVML)",
            bool(pool.devices),
            gpu_detail,
            ""
            if pool.devices
            else "No GPUs found: use --virtual-gpus N to schedule on virtual ids.",
            optional=True,
        )
    )
    if study_file is not None and up:
        study = load_study(study_file)
        spec = resolve_runner("docker", study)
        for image in study_images(study, spec, expand_study(study)):
            inspected = subprocess.run(
                ["docker", "image", "inspect", image], capture_output=True, timeout=15, check=False
            )
            present = inspected.returncode == 0
            checks.append(
                Check(
                    f"image {image}",
                    present,
                    "present" if present else "missing",
                    ""
                    if present
                    else (
                        "`llem-dispatch run` will build it from the study's build: context"
                        if study.build
                        else f"docker build -t {image} . / docker pull"
                    ),
                )
            )
            if present:
                probe = subprocess.run(
                    [
                        "docker",
                        "run",
                        "--rm",
                        "--network",
                        "none",
                        "--label",
                        "llem.managed=1",
                        "--label",
                        "llem.probe=1",
                        image,
                        "true",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                checks.append(
                    Check(
                        f"probe container ({image})",
                        probe.returncode == 0,
                        "ran `true`" if probe.returncode == 0 else probe.stderr.strip()[-200:],
                        "" if probe.returncode == 0 else "See the error above.",
                    )
                )
    return checks


@app.command()
def doctor(
    study_file: Annotated[Path | None, typer.Argument(help="Optional study to check.")] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray", metavar="ADDRESS", help="Check every host of this Ray cluster instead."
        ),
    ] = None,
) -> None:
    """Check the host: Docker daemon, NVIDIA runtime, GPUs, a study's images, a probe run."""
    console = _console()
    try:
        checks = (
            _cluster_checks(ray_address, study_file)
            if ray_address is not None
            else _doctor_checks(study_file)
        )
    except LlemError as exc:
        raise _fail_usage(exc.message, exc.fix_suggestion) from exc
    for check in checks:
        mark = (
            "[green]PASS[/]"
            if check.ok
            else "[yellow]WARN[/]"
            if check.optional
            else "[red]FAIL[/]"
        )
        console.print(f"{mark} {check.name}: {check.detail}", markup=True)
        if check.fix:
            console.print(f"     fix: {check.fix}")
    critical = [c for c in checks if not c.ok and not c.optional]
    raise typer.Exit(EXIT_FAILED if critical else EXIT_OK)


if __name__ == "__main__":
    main()
