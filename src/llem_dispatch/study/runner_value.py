"""The runner value (`NAME | NAME:IMAGE | auto`, NAME a registered kind) and image references."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llem_dispatch.errors import ConfigError
from llem_dispatch.runners.kinds import AUTO, RunnerKind, get_runner_kind
from llem_dispatch.runners.kinds import parse_runner_value as parse_kind_value

__all__ = ["RunnerSpec", "check_image", "parse_runner_value"]

_IMAGE_RE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?"
    r"(?:@sha256:[a-f0-9]{64})?$"
)


def check_image(value: str) -> str:
    """`value` if it is a valid image reference, else a ValueError saying what one looks like."""
    if not _IMAGE_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid image reference (e.g. 'name:tag' or "
            "'registry/name@sha256:...'; lowercase name)"
        )
    return value


@dataclass(frozen=True, slots=True)
class RunnerSpec:
    """Which runner to use, with which image, and why (recorded in every result).

    `kind` is a registered runner kind's name, or `auto` (decided where it runs).
    """

    kind: str
    image: str | None = None
    source: str = "explicit"

    @property
    def auto(self) -> bool:
        """Left to the auto rule (`choose_auto`), decided on the host that runs it."""
        return self.kind == AUTO

    def runner_kind(self) -> RunnerKind:
        """The registered kind (a `ConfigError` for `auto`, which names none yet)."""
        return get_runner_kind(self.kind)


def parse_runner_value(value: str) -> RunnerSpec:
    """'NAME' | 'NAME:IMAGE' | 'auto' -> RunnerSpec, or a clear error (did-you-mean).

    NAME is a registered runner kind (`llem_dispatch.runners.kinds`); `:IMAGE` is
    for kinds that run an image (`docker:IMAGE`).
    """
    try:
        kind, image = parse_kind_value(value)
        if image is not None:
            check_image(image)
    except ValueError as exc:
        raise ConfigError(
            f"runner {value!r}: {exc}",
            fix_suggestion="Set --runner / LLEM_RUNNER / the study's `runner:` to a registered "
            "kind (NAME or NAME:IMAGE for one that runs images) or auto.",
        ) from exc
    return RunnerSpec(kind=kind, image=image)
