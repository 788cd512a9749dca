"""Placements by name: the one place a study's `placement:` value is looked up.

As fsspec's `known_implementations`: each built-in name maps to a dotted path
and the hint to show when it cannot be imported, so a placement's heavy imports
happen only when a study uses it; `register_placement` adds one (a class or a
dotted path), and packages add theirs through the entry-point group
`llem_dispatch.placements`. Nothing else compares placement names.

A placement's settings block (`ray: {...}` in a study file) is validated by the
model its class declares (`Placement.settings_model`); `placement_settings_model`
finds it, from the dotted path a built-in entry names when its class is heavy to
import (Ray's imports the Docker client), else from the class itself.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from dataclasses import dataclass
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING

from llem_dispatch.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic import BaseModel

    from llem_dispatch.dispatch.placement import Placement

__all__ = [
    "CLUSTER_ADDRESS",
    "DEFAULT_PLACEMENT",
    "ENTRY_POINT_GROUP",
    "AddressShorthand",
    "PlacementEntry",
    "known_placements",
    "placement_class",
    "placement_names",
    "placement_settings_model",
    "register_placement",
    "unknown_placement_message",
]

#: The entry-point group other packages register placements in (name = class path).
ENTRY_POINT_GROUP = "llem_dispatch.placements"


@dataclass(frozen=True, slots=True)
class PlacementEntry:
    """One registered placement: where its class is, and what it needs installed."""

    #: `package.module:Class` (imported on first use).
    path: str
    #: What to install when its class or `requires` cannot be imported.
    install_hint: str | None = None
    #: Modules it needs at run time (checked when it is looked up, not at import).
    requires: tuple[str, ...] = ()
    #: `package.module:Model` of its settings block, so a study loads without importing
    #: the class; None: the class's own `settings_model` (imported when asked for).
    settings: str | None = None


@dataclass(frozen=True, slots=True)
class AddressShorthand:
    """A study key (and a run option) short for one placement with one setting given."""

    #: The placement it chooses.
    placement: str
    #: The setting of that placement's block it fills.
    setting: str

    def settings(self, value: str) -> dict[str, str]:
        """The settings block it stands for."""
        return {self.setting: value}


#: A study that names no placement runs here.
DEFAULT_PLACEMENT = "local"
#: `cluster: ADDRESS` (`--ray ADDRESS`, `run_study(cluster=...)`): `placement: ray`
#: with `ray: {address: ADDRESS}`.
CLUSTER_ADDRESS = AddressShorthand("ray", "address")

_RAY_HINT = "pip install 'llem-dispatch[ray]' on the driver and on every node"

_known: dict[str, PlacementEntry] = {
    "local": PlacementEntry("llem_dispatch.dispatch.placement:LocalPlacement"),
    "ray": PlacementEntry(
        "llem_dispatch.cluster.placement:RayPlacement",
        _RAY_HINT,
        requires=("ray",),
        settings="llem_dispatch.cluster.settings:RaySettings",
    ),
    # Slurm's own command-line tools (sbatch, squeue, ...) are checked when it prepares.
    "slurm": PlacementEntry(
        "llem_dispatch.slurm.placement:SlurmPlacement",
        settings="llem_dispatch.slurm.settings:SlurmSettings",
    ),
}
_classes: dict[str, type[Placement]] = {}
_entry_points_loaded = False

#: Every registered placement by name (a read-only view).
known_placements: Mapping[str, PlacementEntry] = MappingProxyType(_known)


def register_placement(
    name: str,
    cls: type[Placement] | str,
    *,
    install_hint: str | None = None,
    requires: tuple[str, ...] = (),
    clobber: bool = False,
) -> None:
    """Make `placement: NAME` choose `cls` (a class, or a `package.module:Class` path).

    Registering a taken name raises `ValueError` unless `clobber=True`.
    """
    if name in _known and not clobber:
        raise ValueError(f"placement {name!r} is already registered ({_known[name].path})")
    if isinstance(cls, str):
        _known[name] = PlacementEntry(cls, install_hint, requires)
        _classes.pop(name, None)
    else:
        _known[name] = PlacementEntry(
            f"{cls.__module__}:{cls.__qualname__}", install_hint, requires
        )
        _classes[name] = cls


def _load_entry_points() -> None:
    """Placements of other packages (once): `name = package.module:Class`."""
    global _entry_points_loaded  # noqa: PLW0603 - a load-once flag of this registry
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name not in _known:
            _known[point.name] = PlacementEntry(point.value)


def placement_names() -> list[str]:
    """Every placement name a study may give, sorted."""
    _load_entry_points()
    return sorted(_known)


def unknown_placement_message(name: str) -> str:
    """'unknown placement ...', with the nearest known name and all of them."""
    names = placement_names()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown placement {name!r}; {hint}known placements: {', '.join(names)}"


def placement_class(name: str) -> type[Placement]:
    """The class registered as `name`, imported now; a `ConfigError` saying what to install."""
    if name in _classes:
        return _classes[name]
    _load_entry_points()
    entry = _known.get(name)
    if entry is None:
        raise ConfigError(
            unknown_placement_message(name),
            fix_suggestion="Set `placement:` to one of the known placements.",
        )
    missing = [m for m in entry.requires if importlib.util.find_spec(m) is None]
    try:
        if missing:
            raise ModuleNotFoundError(f"No module named {missing[0]!r}", name=missing[0])
        module_name, _, attribute = entry.path.partition(":")
        cls: type[Placement] = getattr(importlib.import_module(module_name), attribute)
    except ImportError as exc:
        raise ConfigError(
            f"placement {name!r} cannot be used here: {exc}",
            fix_suggestion=entry.install_hint or f"Install the package that provides {entry.path}.",
        ) from exc
    _classes[name] = cls
    return cls


def placement_settings_model(name: str) -> type[BaseModel] | None:
    """The model of placement `name`'s settings block (None: it takes no settings).

    For a built-in, imported from the path its entry names (light: no Ray, no Docker
    client); for any other, its class's `settings_model`. Unknown names raise as
    `placement_class` does.
    """
    _load_entry_points()
    entry = _known.get(name)
    if entry is not None and entry.settings is not None and name not in _classes:
        module_name, _, attribute = entry.settings.partition(":")
        model: type[BaseModel] = getattr(importlib.import_module(module_name), attribute)
        return model
    return placement_class(name).settings_model
