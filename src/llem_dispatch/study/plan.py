"""The plan: a study expanded into experiments (grid, explicit configs, cycles, order)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import structlog

from llem_dispatch.models import canonical_json, compute_config_hash
from llem_dispatch.study.schema import Experiment, Study

__all__ = ["expand_study"]

log = structlog.get_logger("llem_dispatch.study")


def _configs(study: Study) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{**study.base, **c} for c in study.configs]
    if study.grid:
        keys = list(study.grid)
        for values in itertools.product(*(study.grid[k] for k in keys)):
            out.append({**study.base, **dict(zip(keys, values, strict=True))})
    if not out and study.base:
        out.append(dict(study.base))
    return out


def expand_study(study: Study) -> list[Experiment]:
    """Every (config, cycle) in dispatch order; duplicate configs are dropped with a warning."""
    seen: dict[str, dict[str, Any]] = {}
    for config in _configs(study):
        config_hash = compute_config_hash(config)
        if config_hash in seen:
            log.warning(
                "duplicate_config_dropped",
                config_hash=config_hash,
                config=canonical_json(config)[:200],
            )
            continue
        seen[config_hash] = config
    unique = list(seen.items())
    default = study.gpus_per_experiment
    field = study.gpus_field

    def gpu_count(config: dict[str, Any]) -> int:
        return int(config.get(field, default)) if field else default

    def exp(item: tuple[str, dict[str, Any]], cycle: int) -> Experiment:
        return Experiment(
            config=item[1], config_hash=item[0], cycle=cycle, gpu_count=gpu_count(item[1])
        )

    cycles = range(1, study.n_cycles + 1)
    if study.cycle_order == "sequential":
        return [exp(item, c) for item in unique for c in cycles]
    if study.cycle_order == "interleaved":
        return [exp(item, c) for c in cycles for item in unique]
    rng = random.Random(study.seed)  # noqa: S311 - ordering, not security
    ordered: list[Experiment] = []
    for c in cycles:
        batch = list(unique)
        rng.shuffle(batch)
        ordered.extend(exp(item, c) for item in batch)
    return ordered
