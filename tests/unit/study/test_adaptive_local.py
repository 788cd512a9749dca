"""Adaptive cycles keep a prestarted GPU fed: real local processes on a virtual GPU.

The experiments never converge (random values), so each config runs to `max`; the
records say which runs were prestarted (started before the GPU was free, held at
their gate).
"""

from __future__ import annotations

import itertools
import json
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from llem_dispatch.study import load_study, run_study

EXPERIMENT = textwrap.dedent(
    """
    import random, time

    def run(config):
        time.sleep(config["prepare_s"])  # weights into host memory
        yield
        yield
        time.sleep(config["work_s"])
        return {"e": random.uniform(1, 100)}
    """
)


@pytest.mark.parametrize("configs", [1, 2])
async def test_every_run_after_the_first_is_prestarted(tmp_path: Path, configs: int) -> None:
    (tmp_path / "adaptexp.py").write_text(EXPERIMENT)
    study = {
        "name": "adaptive-prestart",
        "function": "adaptexp:run",
        "runner": "local",
        "virtual_gpus": 1,
        "gpus_per_experiment": 1,
        "prestart": True,
        "experiment_gap_s": 0.1,
        "n_cycles": {"min": 2, "max": 4, "until": {"field": "e", "rel_ci95": 0.01}},
        "base": {"prepare_s": 0.2, "work_s": 0.4},
        "grid": {"i": list(range(configs))},
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study, indent=1))
    out = tmp_path / "out"
    with anyio.fail_after(120):
        summary = await run_study(load_study(path), out, study_dir=tmp_path)
    records = sorted(
        (json.loads(p.read_text()) for p in (out / "records").glob("*.json")),
        key=lambda r: r["started_at"],
    )
    assert len(records) == 4 * configs, "each config runs to max, never past it"
    assert summary.succeeded == 4 * configs
    assert [r["prestarted"] for r in records] == [False] + [True] * (4 * configs - 1)
    assert len(summary.unresolved) == configs
    journal = [json.loads(x) for x in (out / "journal.jsonl").read_text().splitlines()]
    if configs == 1:
        # Alone, it can be fed only by asking for its next cycle before deciding.
        assert [e for e in journal if e["event"] == "cycle_ahead"]


def _gaps(records: list[dict[str, Any]], cooldown: float) -> list[float]:
    """Idle beyond the cooldown between consecutive measured works (`done` to `work`)."""
    ordered = sorted(records, key=lambda r: r["work_started_at"])
    return [
        datetime.fromisoformat(nxt["work_started_at"]).timestamp()
        - datetime.fromisoformat(prev["work_ended_at"]).timestamp()
        - cooldown
        for prev, nxt in itertools.pairwise(ordered)
    ]


@pytest.mark.parametrize("depth", [3, "auto"])
async def test_preparation_longer_than_the_run_before_it_is_started_further_ahead(
    tmp_path: Path, depth: int | str
) -> None:
    """Each preparation takes about three runs' time: one run ahead, the GPU would
    wait about two runs' time for every experiment."""
    (tmp_path / "adaptexp.py").write_text(EXPERIMENT)
    cooldown = 0.1
    study = {
        "name": "deep-prestart",
        "function": "adaptexp:run",
        "runner": "local",
        "virtual_gpus": 1,
        "gpus_per_experiment": 1,
        "prestart": True,
        "prestart_depth": depth,
        "experiment_gap_s": cooldown,
        "base": {"prepare_s": 1.2, "work_s": 0.4},
        "grid": {"i": list(range(10))},
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study, indent=1))
    out = tmp_path / "out"
    with anyio.fail_after(120):
        summary = await run_study(load_study(path), out, study_dir=tmp_path)
    assert summary.succeeded == 10
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    gaps = _gaps(records, cooldown)
    if depth == "auto":
        # It learns: a late one makes it deeper; from then on the GPU does not wait.
        assert any((r["gate_late_s"] or 0) > 0.2 for r in records), "never late: no test"
        gaps = gaps[-4:]
    assert max(gaps) <= 0.3, [round(g, 2) for g in gaps]
