"""The runner value (`NAME | NAME:IMAGE | auto`, NAME a registered kind) and its images.

An image reference is checked by the kind that runs it (`RunnerKind.check_image`):
a registry reference for Docker and Podman, a file path for a file-image kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from llem_dispatch.errors import ConfigError
from llem_dispatch.runners.images import check_registry_reference
from llem_dispatch.runners.kinds import AUTO, RunnerKind, get_runner_kind, kinds_for
from llem_dispatch.runners.kinds import parse_runner_value as parse_kind_value

__all__ = ["RunnerSpec", "check_image", "check_image_for", "parse_runner_value"]

#: A registry reference (`name:tag`, ...): the container kinds' form, kept under its old name.
check_image = check_registry_reference


def check_image_for(runner: str | None, reference: str) -> str:
    """`reference` checked by the kinds that would run it: the study's runner value's
    (under `auto` or none, the auto rule's image kinds); a `ValueError` from the first
    that refuses it. A kind that runs no image leaves it to the auto rule's."""
    value = runner.split(":", 1)[0].strip() if runner else AUTO
    try:
        kinds = [k for k in kinds_for(value) if k.needs_image]
    except ConfigError:
        return reference  # the runner value is wrong: said once, at its own line
    for kind in kinds or [k for k in kinds_for(AUTO) if k.needs_image]:
        kind.check_image(reference)
    return reference


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
            get_runner_kind(kind).check_image(image)
    except ValueError as exc:
        raise ConfigError(
            f"runner {value!r}: {exc}",
            fix_suggestion="Set --runner / LLEM_RUNNER / the study's `runner:` to a registered "
            "kind (NAME or NAME:IMAGE for one that runs images) or auto.",
        ) from exc
    return RunnerSpec(kind=kind, image=image)
