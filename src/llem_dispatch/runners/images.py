"""Image references as the registries write them (`registry/name:tag@sha256:...`).

The Docker and Podman kinds check their images with this; a kind with images of
another form (a file path) checks its own (`RunnerKind.check_image`).
"""

from __future__ import annotations

import re

__all__ = ["check_registry_reference"]

_IMAGE_RE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?"
    r"(?:@sha256:[a-f0-9]{64})?$"
)


def check_registry_reference(value: str) -> str:
    """`value` if it is a valid registry image reference, else a ValueError saying what one
    looks like."""
    if not _IMAGE_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid image reference (e.g. 'name:tag' or "
            "'registry/name@sha256:...'; lowercase name)"
        )
    return value
