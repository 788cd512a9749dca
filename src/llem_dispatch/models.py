"""What crosses the container boundary: configs, results, failures, and the config hash.

Pydantic models for everything a user writes or an experiment returns.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llem_dispatch.errors import ConfigError

__all__ = [
    "ExperimentFailure",
    "ExperimentResult",
    "RunnerMetadata",
    "canonical_json",
    "compute_config_hash",
    "config_to_dict",
    "llenergymeasure_config_hash",
]

HASH_LENGTH = 16


def _check_json(value: Any, path: str) -> None:
    """Reject what JSON cannot hold, naming the offending field."""
    if value is None or isinstance(value, str | bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(
                f"config field {path or '<root>'} is {value!r}, which JSON cannot represent",
                fix_suggestion="Use a finite number or null for this field.",
            )
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"config key {key!r} under {path or '<root>'} is a "
                    f"{type(key).__name__}; JSON object keys must be strings",
                    fix_suggestion="Use string keys in configs.",
                )
            _check_json(item, f"{path}.{key}" if path else key)
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]")
        return
    raise ConfigError(
        f"config field {path or '<root>'} holds a {type(value).__name__}, "
        "which is not JSON-serialisable",
        fix_suggestion="Use only str, int, float, bool, None, lists and string-keyed dicts "
        "(or a pydantic model) in configs.",
    )


class HashedConfig(dict[str, Any]):
    """A config already checked and hashed (by the Dispatcher): runners skip both steps."""

    __slots__ = ("config_hash",)

    def __init__(self, data: Mapping[str, Any], config_hash: str) -> None:
        super().__init__(data)
        self.config_hash = config_hash


def hashed_config(config: BaseModel | Mapping[str, Any]) -> HashedConfig:
    """Check, canonicalise and hash a config once."""
    if isinstance(config, HashedConfig):
        return config
    data = config_to_dict(config)
    digest = hashlib.sha256(canonical_json(data).encode("utf-8"))
    return HashedConfig(data, digest.hexdigest()[:HASH_LENGTH])


def config_to_dict(config: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """Return the config as a plain JSON-able dict, or raise `ConfigError` naming the field."""
    if isinstance(config, HashedConfig):
        return config
    if isinstance(config, BaseModel):
        data = config.model_dump(mode="json")
    elif isinstance(config, Mapping):
        data = dict(config)
    else:
        raise ConfigError(
            f"config must be a pydantic model or a mapping, not {type(config).__name__}",
            fix_suggestion="Pass a dict of parameters or a pydantic model instance.",
        )
    _check_json(data, "")
    return data


def canonical_json(data: Any) -> str:
    """JSON with sorted keys and no whitespace: the form the config hash is taken over."""
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def compute_config_hash(config: BaseModel | Mapping[str, Any]) -> str:
    """First 16 hex chars of SHA-256 over the config's canonical JSON.

    Stable across runs, processes and dict orderings. Which runner, image or GPUs
    run the config is deliberately not part of the hash.
    """
    return hashed_config(config).config_hash


def llenergymeasure_config_hash(config: BaseModel | Mapping[str, Any]) -> str:
    """llenergymeasure's hash: SHA-256 over `json.dumps(config, sort_keys=True)`, 16 hex chars.

    It differs from `compute_config_hash` in its separators (`", "`, `": "`), and
    llenergymeasure hashes its `ExperimentConfig` after filling in defaults: pass
    `ExperimentConfig(**raw).model_dump()` for the two to agree. The runners read
    a result named by this hash on their own (the one `*_result.json` there is).
    """
    data = config_to_dict(config)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:HASH_LENGTH]


class RunnerMetadata(BaseModel):
    """Where and how one experiment ran: enough to reproduce it."""

    model_config = ConfigDict(frozen=True)

    runner_type: str = Field(description="'docker' or 'local' (or a custom runner's name).")
    runner_image: str | None = Field(default=None, description="Image reference as given.")
    image_digest: str | None = Field(
        default=None, description="Repo digest, or the image id when the image has none."
    )
    runner_source: str = Field(default="explicit", description="How the runner was chosen.")
    container_id: str | None = None
    process_id: int | None = None
    gpu_ids: list[str] = Field(default_factory=list)
    exit_code: int | None = None
    result_file: str | None = Field(
        default=None, description="The file the result was read from, in the exchange dir."
    )

    def as_effective_config(self) -> dict[str, Any]:
        """The keys injected into a result's `effective_config`."""
        return self.model_dump(mode="json", exclude_none=False)


class ExperimentResult(BaseModel):
    """Default result model: the experiment's JSON as-is plus where it ran."""

    config_hash: str
    data: dict[str, Any] = Field(description="The result JSON the experiment wrote.")
    effective_config: dict[str, Any] = Field(
        default_factory=dict, description="The config as run, with runner metadata added."
    )
    runner: RunnerMetadata


class ExperimentFailure(BaseModel):
    """An experiment that ran and reported its own failure (an error payload)."""

    type: str
    message: str
    traceback: str | None = None
    config_hash: str
    exchange_dir: str | None = None
    container_id: str | None = None
    log_path: str | None = None
    exit_code: int | None = None
