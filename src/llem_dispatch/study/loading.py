"""Loading a study file: YAML with the line of every key, so each problem names its line."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llem_dispatch.errors import ConfigError
from llem_dispatch.study.schema import Study

__all__ = ["load_study"]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key, by dotted path."""


def _key_lines(node: yaml.Node, prefix: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            out[path] = key_node.start_mark.line + 1
            _key_lines(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, index)
            out[path] = item.start_mark.line + 1
            _key_lines(item, path, out)


def load_study(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> Study:
    """Load and validate a study file; every problem is reported at once with its line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read study file {path}: {exc.strerror}", fix_suggestion="Check the path."
        ) from exc
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: not valid YAML: {exc}",
            fix_suggestion="Fix the YAML syntax at the line shown.",
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the study must be a YAML mapping of fields",
            fix_suggestion="Start from examples/quickstart/study.yaml.",
        )
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _key_lines(node, (), lines)
    data.update(overrides or {})
    try:
        return Study.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            where = f"{path}:{line}" if line else str(path)
            field_name = ".".join(str(p) for p in loc) or "<study>"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown field (allowed: {', '.join(sorted(Study.model_fields))})"
            problems.append(f"  {where}: {field_name}: {message}")
        raise ConfigError(
            f"{path}: {len(problems)} problem(s) in the study file:\n" + "\n".join(problems),
            fix_suggestion="Correct each field listed above; nothing was run.",
        ) from exc
