"""The Container Device Interface (CDI) edge: device names, spec files, GPU UUIDs.

CDI names a device `vendor/class=name` (NVIDIA's toolkit: `nvidia.com/gpu=<UUID>`);
an engine with CDI on (Docker 25+ behind its `cdi` feature, Podman natively) reads
the specs in its spec dirs (`/etc/cdi`, `/var/run/cdi`) and gives a container
exactly the edits of the devices it names. This module reads those specs, so a
study can be checked before anything runs: is every GPU of the host named in them?

Stdlib and PyYAML only; pure apart from reading the spec files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = [
    "DEFAULT_CDI_KIND",
    "DEFAULT_SPEC_DIRS",
    "CdiSpecs",
    "check_kind",
    "is_gpu_uuid",
    "qualified_name",
    "read_specs",
]

#: The kind NVIDIA's container toolkit (`nvidia-ctk cdi generate`) writes.
DEFAULT_CDI_KIND = "nvidia.com/gpu"
#: Where engines look for specs unless configured otherwise (the CDI spec's defaults).
DEFAULT_SPEC_DIRS: tuple[str, ...] = ("/etc/cdi", "/var/run/cdi")
#: `vendor/class`: the vendor a domain-like name, the class a plain name (CDI spec).
_KIND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*[A-Za-z0-9]/[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: NVML's UUIDs: a GPU's ("GPU-<uuid>") or a MIG instance's ("MIG-<uuid>").
_UUID_RE = re.compile(r"^(GPU|MIG)-[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}$")
_SPEC_SUFFIXES = (".yaml", ".yml", ".json")


def is_gpu_uuid(device_id: str) -> bool:
    """Whether `device_id` is an NVML UUID (`GPU-...` or `MIG-...`), not an index."""
    return bool(_UUID_RE.match(device_id))


def check_kind(kind: str) -> str:
    """`kind` if it is a valid CDI kind (`vendor/class`), else ValueError saying the form."""
    if not _KIND_RE.match(kind):
        raise ValueError(
            f"{kind!r} is not a CDI kind: it must read vendor/class, "
            "e.g. nvidia.com/gpu (the `kind:` of a spec under /etc/cdi)"
        )
    return kind


def qualified_name(kind: str, device: str) -> str:
    """The fully qualified CDI device name an engine is asked for: `kind=device`."""
    return f"{kind}={device}"


@dataclass(frozen=True, slots=True)
class CdiSpecs:
    """What the spec files in some dirs offer: device names by kind, and what was unreadable."""

    devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: The spec files read, by kind.
    files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: 'path: why' for each file that could not be read as a spec.
    problems: tuple[str, ...] = ()

    def names(self, kind: str) -> tuple[str, ...]:
        """The device names a kind offers (none when no spec has that kind)."""
        return self.devices.get(kind, ())

    def missing(self, kind: str, device_ids: Iterable[str]) -> list[str]:
        """Those of `device_ids` that no spec of `kind` names."""
        offered = set(self.names(kind))
        return [d for d in device_ids if d not in offered]


def read_specs(dirs: Sequence[str | Path] = DEFAULT_SPEC_DIRS) -> CdiSpecs:
    """Read every spec file (`*.yaml`, `*.yml`, `*.json`) in `dirs`; never raises.

    A file that is not a readable spec is reported in `problems` and skipped,
    as engines skip it. Missing dirs offer nothing.
    """
    devices: dict[str, list[str]] = {}
    files: dict[str, list[str]] = {}
    problems: list[str] = []
    for directory in dirs:
        folder = Path(directory)
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix not in _SPEC_SUFFIXES or not path.is_file():
                continue
            try:
                kind, names = _read_spec(path)
            except (OSError, TypeError, ValueError, yaml.YAMLError) as exc:
                problems.append(f"{path}: {exc}")
                continue
            files.setdefault(kind, []).append(str(path))
            offered = devices.setdefault(kind, [])
            offered.extend(n for n in names if n not in offered)
    return CdiSpecs(
        devices={k: tuple(v) for k, v in devices.items()},
        files={k: tuple(v) for k, v in files.items()},
        problems=tuple(problems),
    )


def _read_spec(path: Path) -> tuple[str, list[str]]:
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise TypeError("not a CDI spec (no mapping at the top)")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise TypeError("not a CDI spec (no `kind:`)")
    check_kind(kind)
    entries = data.get("devices") or []
    if not isinstance(entries, list):
        raise TypeError("`devices:` is not a list")
    names = [str(e["name"]) for e in entries if isinstance(e, dict) and e.get("name")]
    return kind, names
