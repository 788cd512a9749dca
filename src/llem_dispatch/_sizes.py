"""Sizes as people write them ("8g", "512m", bytes), in binary units as Docker reads them."""

from __future__ import annotations

import re

__all__ = ["parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: int | str) -> int:
    """'8g' / '512m' / 1024 -> bytes (binary units, as `docker run --shm-size`)."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"cannot parse size {value!r}; use e.g. '8g', '512m' or bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
