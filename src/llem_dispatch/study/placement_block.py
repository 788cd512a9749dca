"""The study's placement and its settings block, as the study file gives them.

A block named after the study's placement (`ray: {...}`) is validated by the model
that placement declares (`Placement.settings_model`, found through the registry
without importing the placement); every problem is reported at its key, so the
loader names its line: a block of another placement, a key the model has not (with
the nearest one it has), a wrong value.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from llem_dispatch.dispatch.registry import (
    CLUSTER_ADDRESS,
    DEFAULT_PLACEMENT,
    placement_names,
    placement_settings_model,
    unknown_placement_message,
)
from llem_dispatch.errors import ConfigError

__all__ = ["chosen_placement", "placement_block", "raised_again"]


def chosen_placement(value: str, cluster: str | None) -> str:
    """The placement a study names (`cluster: ADDRESS` implies its own); ValueError if none."""
    shorthand = CLUSTER_ADDRESS.placement
    if not value:
        return shorthand if cluster else DEFAULT_PLACEMENT
    if value not in placement_names():
        raise ValueError(unknown_placement_message(value))
    if cluster and value != shorthand:
        raise ValueError(
            f"`cluster: {cluster}` runs on a Ray cluster, but `placement: {value}` was given: "
            f"drop `cluster:`, or use `placement: {shorthand}` with "
            f"`{shorthand}: {{{CLUSTER_ADDRESS.setting}: ...}}`"
        )
    return value


def raised_again(error: Any) -> InitErrorDetails:
    """One reported problem, as it can be raised again (its type and words kept)."""
    return InitErrorDetails(
        type=PydanticCustomError(error["type"], error["msg"]),
        loc=tuple(error["loc"]),
        input=error.get("input"),
    )


def _located(loc: tuple[str | int, ...], message: str, value: Any) -> InitErrorDetails:
    """A problem found here, at `loc` (the loader names that key's line)."""
    return InitErrorDetails(
        type=PydanticCustomError("value_error", f"Value error, {message}"), loc=loc, input=value
    )


def placement_block(
    placement: str, blocks: Mapping[str, Any], cluster: str | None, errors: list[InitErrorDetails]
) -> BaseModel | None:
    """The settings of `placement` from its block, validated by its own model; each problem
    (a block for another placement, a key it has not, a wrong value) goes into `errors`."""
    for owner, value in blocks.items():
        # `ray: null` is no block (the study.yaml of older results dirs says so).
        if owner != placement and value is not None:
            errors.append(
                _located(
                    (owner,),
                    f"a `{owner}:` block, but the study runs on `placement: {placement}`: "
                    f"add `placement: {owner}`, or drop the block",
                    value,
                )
            )
    block = blocks.get(placement)
    try:
        model = placement_settings_model(placement)
    except ConfigError as exc:
        errors.append(_located(("placement",), f"{exc.message} ({exc.fix_suggestion})", placement))
        return None
    if model is None:
        if block is not None:
            errors.append(
                _located((placement,), f"placement {placement!r} takes no settings: drop it", block)
            )
        return None
    given = dict(block) if isinstance(block, Mapping) else block
    if cluster and isinstance(given, dict | None) and placement == CLUSTER_ADDRESS.placement:
        # The older, shorter form: `cluster: ADDRESS`.
        key = CLUSTER_ADDRESS.setting
        if given and key in given and given[key] != cluster:
            message = f"`cluster: {cluster}` and `{placement}: {{{key}: ...}}` disagree: "
            errors.append(_located((placement,), message + f"give the {key} once", block))
            return None
        given = {**(given or {}), **CLUSTER_ADDRESS.settings(cluster)}
    try:
        return model.model_validate(given if given is not None else {})
    except ValidationError as exc:
        errors.extend(_setting_error(placement, model, e) for e in exc.errors())
        return None


def _setting_error(placement: str, model: type[BaseModel], error: Any) -> InitErrorDetails:
    """A problem inside a placement's block, at its key; a key the model has not, with the
    nearest one it has."""
    loc = (placement, *error["loc"])
    if error["type"] != "extra_forbidden" or len(error["loc"]) != 1:
        return InitErrorDetails(
            type=PydanticCustomError(error["type"], error["msg"]), loc=loc, input=error.get("input")
        )
    known = sorted(model.model_fields)
    close = difflib.get_close_matches(str(error["loc"][0]), known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    message = f"unknown field; {hint}(settings of placement {placement!r}: {', '.join(known)})"
    return InitErrorDetails(
        type=PydanticCustomError("unknown_setting", message), loc=loc, input=error.get("input")
    )
