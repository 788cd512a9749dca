"""Loading a study file: YAML with the line of every key, so each problem names its line."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
import yaml
from pydantic import ValidationError

from llem_dispatch.errors import ConfigError
from llem_dispatch.study.schema import Study

__all__ = ["load_study"]


#: Nodes a study file may expand to once YAML aliases are followed (an alias bomb
#: of 10 levels expands to 10^10; a real study to a few thousand).
MAX_EXPANDED_NODES = 1_000_000


log = structlog.get_logger("llem_dispatch.study")


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key, by dotted path."""


def _key_lines(
    node: yaml.Node,
    prefix: tuple[Any, ...],
    out: dict[tuple[Any, ...], int],
    duplicates: list[str],
    seen: set[int],
) -> None:
    """Line of every key by path, visiting each node once (aliases share nodes)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            path = (*prefix, key)
            if isinstance(key_node, yaml.ScalarNode) and key != "<<":
                if key in first:
                    where = ".".join(str(p) for p in path)
                    duplicates.append(f"{where} is given twice, at lines {first[key]} and {line}")
                first.setdefault(key, line)
            out.setdefault(path, line)
            _key_lines(value_node, path, out, duplicates, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, index)
            out.setdefault(path, item.start_mark.line + 1)
            _key_lines(item, path, out, duplicates, seen)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (memoised: linear)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once rather than forever
    children: list[yaml.Node] = []
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    total = 1 + sum(_expanded_size(child, memo) for child in children)
    memo[id(node)] = total
    return total


def _parse(path: Path, text: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    """The study's data and key lines; refuses alias bombs and duplicate keys, unexpanded."""
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[tuple[Any, ...], int] = {}
        duplicates: list[str] = []
        if node is not None:
            size = _expanded_size(node, {})
            if size > MAX_EXPANDED_NODES:
                raise ConfigError(
                    f"{path}: the YAML expands to {size:,} values through its aliases (over "
                    f"{MAX_EXPANDED_NODES:,}); refusing to load it",
                    fix_suggestion="Remove the nested `&anchor` / `*alias` references that "
                    "multiply each other, or write the values out.",
                )
            _key_lines(node, (), lines, duplicates, set())
        if duplicates:
            raise ConfigError(
                f"{path}: " + "; ".join(duplicates),
                fix_suggestion="Keep one of each key (YAML would silently keep the last).",
            )
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: not valid YAML: {exc}",
            fix_suggestion="Fix the YAML syntax at the line shown.",
        ) from exc
    except RecursionError as exc:
        raise ConfigError(
            f"{path}: the YAML is nested too deeply to read",
            fix_suggestion="Flatten the study file: a study needs only a few levels.",
        ) from exc
    finally:
        loader.dispose()
    return data, lines


def _unknown_field(name: str, depth: int) -> str:
    """'unknown field', with the nearest known name when there is one."""
    if depth > 1:
        return "unknown field"
    # The keys a study file uses: `gpus`, not the attribute's name `gpu_ids`; `ray:`.
    known = Study.file_keys()
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown field; {hint}(allowed: {', '.join(known)})"


def load_study(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> Study:
    """Load and validate a study file; every problem is reported at once with its line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read study file {path}: {exc.strerror}", fix_suggestion="Check the path."
        ) from exc
    data, lines = _parse(path, text)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the study must be a YAML mapping of fields",
            fix_suggestion="Start from examples/quickstart/study.yaml.",
        )
    data.update(overrides or {})
    try:
        study = Study.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            where = f"{path}:{line}" if line else str(path)
            if loc and loc[0] in (overrides or {}):
                where = f"{path} (overridden on the command line)"
            field_name = ".".join(str(p) for p in loc) or "<study>"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = _unknown_field(str(loc[-1]), len(loc))
            problems.append(f"  {where}: {field_name}: {message}")
        raise ConfigError(
            f"{path}: {len(problems)} problem(s) in the study file:\n" + "\n".join(problems),
            fix_suggestion="Correct each field listed above; nothing was run.",
        ) from exc
    _warn_gpus_unused(study, data, path, lines)
    return study


def _warn_gpus_unused(
    study: Study, data: Mapping[str, Any], path: Path, lines: Mapping[tuple[Any, ...], int]
) -> None:
    """A study that names GPUs but gives its experiments none: say, at its line, what 0 means."""
    named = [k for k in ("virtual_gpus", "gpus") if data.get(k) is not None]
    if not named or "gpus_per_experiment" in data or study.gpus_field is not None:
        return
    line = lines.get((named[0],))
    log.warning(
        "study_gives_experiments_no_gpus",
        where=f"{path}:{line}" if line else str(path),
        message=f"`{named[0]}` names GPUs, but `gpus_per_experiment` is not set: every "
        "experiment gets 0 GPUs, all of them run at once, and prestart does nothing",
        fix="Add `gpus_per_experiment: 1` (or the count each experiment needs), or "
        "`gpus_per_experiment: 0` to say that no experiment uses a GPU.",
    )
