"""The gate in front of a `command:` run's own program: a POSIX shell wait, then `exec`.

A prestarted `command:` run starts as `/bin/sh -c SHELL_GATE llem-gate ARGV...`:
the shell blocks reading the gate's FIFO ($LLEM_GO_FIFO: no CPU while it waits),
makes sure of the go file ($LLEM_GO_PATH; polled every 10 ms where there is no
FIFO, or reading it failed) and then `exec`s ARGV unchanged
(same pid, environment, working directory and stdio), so the image's own command
runs exactly as it would have, only later. Any image with /bin/sh can be gated;
one without (distroless, scratch) cannot, and its start fails naming this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llem_dispatch.errors import ConfigError

__all__ = [
    "GATE_ENTRYPOINT",
    "NO_SHELL",
    "NO_SHELL_FIX",
    "SHELL_GATE",
    "gated_argv",
    "gated_spec",
    "image_argv",
]

#: Blocks on the FIFO, then polls the go file every 10 ms (a fractional `sleep`:
#: busybox's, coreutils') until it exists, then `exec`s the command.
SHELL_GATE = (
    'if [ -p "${LLEM_GO_FIFO:-}" ] && [ ! -e "$LLEM_GO_PATH" ]; '
    'then read -r _ < "$LLEM_GO_FIFO"; fi; '
    'while [ ! -e "$LLEM_GO_PATH" ]; do sleep 0.01; done; exec "$@"'
)
#: The Entrypoint of a gated container: its Cmd (the original argv) becomes "$@".
GATE_ENTRYPOINT: tuple[str, ...] = ("/bin/sh", "-c", SHELL_GATE, "llem-gate")
#: In a start error of a gated run: the image has no shell for the gate.
NO_SHELL = '"/bin/sh"'
NO_SHELL_FIX = (
    "This image has no /bin/sh, which a prestarted `command:` run's gate needs: set "
    "`prestart: false` for it, or use `function:` in an image with python3."
)


def gated_argv(argv: Sequence[str]) -> list[str]:
    """`argv` behind the shell gate (a host process's command line)."""
    if not argv:
        raise ConfigError(
            "nothing to run behind the prestart gate: the command is empty",
            fix_suggestion="Give the study a `command:` (or an image with a CMD).",
        )
    return [*GATE_ENTRYPOINT, *argv]


def gated_spec(
    image_config: Mapping[str, Any] | None, command: Sequence[str] | None
) -> dict[str, list[str]]:
    """The create body's Entrypoint and Cmd that hold a container's own command at the gate."""
    argv = gated_argv(image_argv(image_config, command))
    return {"Entrypoint": argv[: len(GATE_ENTRYPOINT)], "Cmd": argv[len(GATE_ENTRYPOINT) :]}


def image_argv(image_config: Mapping[str, Any] | None, command: Sequence[str] | None) -> list[str]:
    """What a container of this image runs: its Entrypoint + (`command` or its Cmd).

    As the Engine does it: a `command` replaces the image's Cmd, never its Entrypoint.
    """
    config = image_config or {}
    entrypoint = list(config.get("Entrypoint") or [])
    cmd = list(command) if command is not None else list(config.get("Cmd") or [])
    return entrypoint + cmd
