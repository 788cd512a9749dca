"""The typer app every command registers on, and what the commands share."""

from __future__ import annotations

import logging

import typer
from rich.console import Console

from llem_dispatch import _logging

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "app",
    "fail_usage",
    "main",
    "make_console",
]

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


def make_console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def fail_usage(message: str, fix: str | None = None) -> typer.Exit:
    err = make_console(stderr=True)
    err.print(f"[bold red]error:[/] {message}")
    if fix:
        err.print(f"[bold]fix:[/] {fix}")
    return typer.Exit(EXIT_USAGE)
