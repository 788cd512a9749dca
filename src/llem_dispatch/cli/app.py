"""The typer app every command registers on, and what the commands share."""

from __future__ import annotations

import logging
import os
import sys
from typing import IO, Annotated, Any, cast

import structlog
import typer
from rich.console import Console
from rich.text import Text

from llem_dispatch import _logging

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "EngineUrlOption",
    "app",
    "fail_usage",
    "main",
    "make_console",
    "use_engine_url",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: `--engine-url`: the container engine's API socket for engine kinds that read
#: LLEM_ENGINE_URL (podman; Docker keeps DOCKER_HOST).
EngineUrlOption = Annotated[
    str | None,
    typer.Option(
        "--engine-url",
        metavar="URL",
        help="The container engine's API, e.g. unix:///run/user/1000/podman/podman.sock "
        "(runner podman; same as LLEM_ENGINE_URL). Docker: DOCKER_HOST.",
    ),
]


def use_engine_url(url: str | None) -> None:
    """`--engine-url` given: the engine kinds (and any process they start) read it."""
    if url:
        os.environ["LLEM_ENGINE_URL"] = url


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


class _Stdout:
    """`sys.stdout` that outlives its reader: a closed pipe (`| head`, a dropped `| tee`)
    ends the printing, never the sweep behind it.

    Writes go to whatever `sys.stdout` is now (rich's Live swaps in a proxy). On the
    first EPIPE, fd 1 is pointed at /dev/null, so neither later writes nor the
    interpreter's last flush fail, and one warning goes to the log (stderr).
    """

    def __init__(self) -> None:
        self.reader_gone = False

    @staticmethod
    def _stream() -> Any:
        return getattr(sys.stdout, "rich_proxied_file", sys.stdout)

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                self._stream().write(text)
            except BrokenPipeError:
                self._lost()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream().flush()
            except BrokenPipeError:
                self._lost()

    def _lost(self) -> None:
        self.reader_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream().fileno())
        finally:
            os.close(devnull)
        structlog.get_logger("llem_dispatch.cli").warning(
            "stdout_closed",
            detail="the reader of standard output went away: printing stops, the study "
            "goes on; its records and exit status are unaffected",
        )

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding... for rich
        return getattr(self._stream(), name)


def make_console(stderr: bool = False) -> Console:
    """A console that never reads markup from text: messages, fixes, paths and config
    values carry brackets (`pip install 'llem-dispatch[analysis]'`) that rich would
    otherwise take for tags and drop. Style goes in through `Text` spans instead.

    On stdout it survives a closed pipe (see `_Stdout`)."""
    return Console(
        file=None if stderr else cast("IO[str]", _Stdout()),
        stderr=stderr,
        highlight=False,
        soft_wrap=False,
        markup=False,
    )


def fail_usage(message: str, fix: str | None = None) -> typer.Exit:
    err = make_console(stderr=True)
    err.print(Text.assemble(("error:", "bold red"), " ", message))
    if fix:
        err.print(Text.assemble(("fix:", "bold"), " ", fix))
    return typer.Exit(EXIT_USAGE)
