"""`llem-dispatch reap`: remove containers of dispatchers that are gone, keep their logs.

Each runner kind reaps its own leftovers, on its own engine (`RunnerKind.reap`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import anyio
import typer
from rich.console import Console
from rich.table import Table

from llem_dispatch.cli.app import (
    app,
    fail_usage,
    make_console,
)
from llem_dispatch.cluster import sweep_cluster
from llem_dispatch.errors import LlemError
from llem_dispatch.runners.kinds import AUTO, get_runner_kind, kinds_for

if TYPE_CHECKING:
    from llem_dispatch.reap import ReapedContainer

__all__ = ["reap"]


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
    engine_url: Annotated[
        str | None,
        typer.Option(
            "--engine-url",
            metavar="URL",
            help="Reap on this engine's API instead of the kind's own (a Podman socket, say).",
        ),
    ] = None,
    runner: Annotated[
        str | None,
        typer.Option(
            "--runner",
            metavar="KIND",
            help="Reap what this runner kind left (on its engine); default: the auto "
            "rule's container kinds (Docker).",
        ),
    ] = None,
) -> None:
    """Remove containers left by dispatchers that are gone (their logs are kept)."""
    console = make_console()
    if ray_address is not None:
        _reap_cluster(ray_address, results_dir, dry_run, console)
        return
    found: list[ReapedContainer] = []
    try:
        kinds = [get_runner_kind(runner)] if runner else kinds_for(AUTO)
        for kind in (k for k in kinds if k.reapable):
            found += anyio.run(
                functools.partial(
                    kind.reap,
                    results_dir=results_dir,
                    dry_run=dry_run,
                    logs_dir=Path("llem-orphan-logs"),
                    engine_url=engine_url,
                )
            )
    except LlemError as exc:
        raise fail_usage(exc.message, exc.fix_suggestion) from exc
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
        raise fail_usage(exc.message, exc.fix_suggestion) from exc
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
