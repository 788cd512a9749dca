"""11. Preparation longer than the run before it: the GPU's wait, prestart depth 1, auto, 3.

A local `function:` study on one virtual GPU whose preparation (before its first
`yield`, the gate) takes PREPARE_S, about three times one run's hold of the GPU
(WORK_S plus the COOLDOWN_S): one run ahead, every experiment's GPU waits about two
runs' time for its preparation. Three studies, the same experiments, alternated in
rounds: `prestart_depth: 1`, `auto` (learns the depth from the measured preparation
and hold), and 3 (what it should learn). Per gap, from the records: how long the GPU
waited beyond the cooldown for the next experiment (its gate, or its `ready` mark if
later, minus the previous `done` plus the cooldown).

Target: `auto`'s total wait at most 0.25x depth 1's, and at most one gap over 0.3 s
(the one before the first experiment has finished: nothing is measured yet).
"""

from __future__ import annotations

import itertools
import json
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks._common import Context, median, table
from llem_dispatch.study import load_study, run_study

NAME = "prepare_depth"
TITLE = "GPU wait for preparations 3x a run long: prestart depth 1, auto and 3"
NEEDS_DOCKER = False

WORK_S = 0.4
COOLDOWN_S = 0.1
PREPARE_S = 1.5
EXPERIMENT = textwrap.dedent(
    """
    import time

    def run(config):
        time.sleep(config["prepare_s"])  # weights into host memory: before the gate
        yield
        yield  # measuring from here
        time.sleep(config["work_s"])
        return {"i": config["i"]}
    """
)


def _t(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def waits(records: list[dict[str, Any]]) -> list[float]:
    """Per gap, seconds the GPU waited beyond the cooldown for the next experiment."""

    def ready(record: dict[str, Any]) -> float:
        gate = _t(record.get("gate_opened_at"))
        if gate is not None:
            return gate + float(record.get("gate_late_s") or 0.0)
        return (_t(record["started_at"]) or 0.0) + float(record.get("prepare_s") or 0.0)

    ordered = sorted(records, key=ready)
    return [
        max(0.0, ready(after) - (_t(before["work_ended_at"]) or 0.0) - COOLDOWN_S)
        for before, after in itertools.pairwise(ordered)
    ]


async def one_study(ctx: Context, depth: int | str, count: int) -> list[dict[str, Any]]:
    folder = ctx.scratch(f"depth-{depth}-")
    (folder / "depthexp.py").write_text(EXPERIMENT)
    study = {
        "name": f"prepare-depth-{depth}",
        "function": "depthexp:run",
        "runner": "local",
        "virtual_gpus": 1,
        "gpus_per_experiment": 1,
        "prestart": True,
        "prestart_depth": depth,
        "experiment_gap_s": COOLDOWN_S,
        "base": {"prepare_s": PREPARE_S, "work_s": WORK_S},
        "grid": {"i": list(range(count))},
    }
    path = folder / "study.yaml"
    path.write_text(json.dumps(study, indent=1))
    out = folder / "out"
    summary = await run_study(load_study(path), out, study_dir=folder)
    if summary.succeeded != count:
        raise RuntimeError(f"depth {depth}: {summary.succeeded} of {count} succeeded")
    return [json.loads(p.read_text()) for p in sorted(Path(out, "records").glob("*.json"))]


async def run(ctx: Context) -> None:
    count, rounds = (12, 1) if ctx.smoke else (12, 3)
    depths: list[int | str] = [1, "auto", 3]
    gaps: dict[str, list[list[float]]] = {str(d): [] for d in depths}
    for turn in range(rounds):
        for depth in depths if turn % 2 == 0 else depths[::-1]:
            gaps[str(depth)].append(waits(await one_study(ctx, depth, count)))
    print(
        f"  {count} experiments on 1 virtual GPU, {rounds} round(s) alternated; each prepares "
        f"{PREPARE_S} s, works {WORK_S} s, cooldown {COOLDOWN_S} s"
    )
    rows = []
    for depth, runs in gaps.items():
        totals = [sum(g) for g in runs]
        over = [sum(1 for w in g if w > 0.3) for g in runs]
        rows.append(
            [
                depth,
                " ".join(f"{t:.2f}" for t in totals),
                f"{median([w for g in runs for w in g]):.3f}",
                f"{max(w for g in runs for w in g):.2f}",
                " ".join(str(o) for o in over),
            ]
        )
    table(["depth", "total wait s (per round)", "median s", "max s", "gaps > 0.3 s"], rows)
    auto = [sum(g) for g in gaps["auto"]]
    one = [sum(g) for g in gaps["1"]]
    ratio = median(auto) / median(one) if median(one) > 0 else 0.0
    ctx.check(
        "GPU wait, auto / depth 1 (median of rounds)", f"{ratio:.3f}", "<= 0.25", ratio <= 0.25
    )
    worst = max(sum(1 for w in g if w > 0.3) for g in gaps["auto"])
    ctx.check("auto: gaps over 0.3 s (worst round)", str(worst), "<= 1", worst <= 1)
