"""The plan: a study expanded into experiments (grid, explicit configs, cycles, order)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import structlog

from llem_dispatch.models import canonical_json, compute_config_hash
from llem_dispatch.study.schema import Experiment, Study

__all__ = ["cycle_experiments", "expand_study", "unique_configs"]

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


def unique_configs(study: Study) -> list[tuple[str, dict[str, Any]]]:
    """(config hash, config) of every distinct config, in study order; duplicates dropped."""
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
    return list(seen.items())


def _experiment(study: Study, item: tuple[str, dict[str, Any]], cycle: int) -> Experiment:
    field, default = study.gpus_field, study.gpus_per_experiment
    count = int(item[1].get(field, default)) if field else default
    return Experiment(config=item[1], config_hash=item[0], cycle=cycle, gpu_count=count)


def expand_study(study: Study) -> list[Experiment]:
    """Every (config, cycle) in dispatch order; duplicate configs are dropped with a warning.

    An adaptive study (`n_cycles: {min, max, until}`) expands to its first `min`
    cycles; `cycle_experiments` adds each later one, to the configs that need it.
    """
    unique = unique_configs(study)
    cycles = range(1, study.min_cycles + 1)
    if study.cycle_order == "sequential":
        return [_experiment(study, item, c) for item in unique for c in cycles]
    if study.cycle_order == "interleaved":
        return [_experiment(study, item, c) for c in cycles for item in unique]
    rng = random.Random(study.seed)  # noqa: S311 - ordering, not security
    ordered: list[Experiment] = []
    for c in cycles:
        batch = list(unique)
        rng.shuffle(batch)
        ordered.extend(_experiment(study, item, c) for item in batch)
    return ordered


def cycle_experiments(
    study: Study, items: list[tuple[str, dict[str, Any]]], cycle: int
) -> list[Experiment]:
    """Cycle `cycle` (beyond `min`) of these configs, in the study's cycle order.

    One cycle per config: sequential and interleaved keep study order; shuffled
    draws an order from (seed, cycle), so a resumed study draws the same one.
    """
    batch = list(items)
    if study.cycle_order == "shuffled":
        random.Random(f"{study.seed}:{cycle}").shuffle(batch)  # noqa: S311 - ordering
    return [_experiment(study, item, cycle) for item in batch]
