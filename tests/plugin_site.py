"""A plugin distribution of tests/plugins put on a path as pip would install it.

Its package copied into `target`, beside a dist-info made from its pyproject.toml
(METADATA and entry_points.txt), so `importlib.metadata.entry_points` finds its
entry points once `target` is on `sys.path` or PYTHONPATH: no pip, no network.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path


def install_plugin(plugin: Path, target: Path) -> Path:
    """`plugin`'s package (the folder of its own name) and a dist-info, in `target`."""
    project = tomllib.loads((plugin / "pyproject.toml").read_text())["project"]
    shutil.copytree(plugin / plugin.name, target / plugin.name)
    dist = target / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    lines = []
    for group, points in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in points.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return target
