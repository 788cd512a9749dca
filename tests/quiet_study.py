"""A study whose measured windows are a CPU-bound loop while the next experiment prepares.

Each experiment stamps its own prepare progress (one wall-clock time per 10 ms of CPU
it spent preparing) and its measured window; `check_quiet` asserts on those stamps
against the windows of the others: under `pause` no neighbour makes progress inside
a window (and makes it again after), under `run` one does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EXPERIMENT = '''
import time

def _spin(cpu_s):
    """Burn `cpu_s` of CPU time: a frozen process burns none, so it waits."""
    end = time.process_time() + cpu_s
    while time.process_time() < end:
        pass

def run(config):
    progress = []
    for _ in range(config["prepare_steps"]):
        _spin(0.01)
        progress.append(time.time())
    yield  # prepared (prestarted: waits for its gate here)
    yield  # measuring starts (the quiet window opens before this returns)
    start = time.time()
    _spin(config["work_s"])
    end = time.time()
    with open("/proc/self/status") as status:
        allowed = [line.split(":", 1)[1].strip() for line in status
                   if line.startswith("Cpus_allowed_list")]
    return {"i": config["i"], "progress": progress, "work_start": start, "work_end": end,
            "cpus_allowed": allowed[0] if allowed else None}
'''

#: Per experiment, CPU seconds of preparation (in 10 ms steps): the first is short so its
#: window opens early; the second's window opens while the third prepares.
PREPARE_STEPS = (5, 30, 150)
WORK_S = 0.6


def write_quiet_study(
    folder: Path, *, policy: str, header: Mapping[str, Any] | None = None
) -> Path:
    """The experiment module and a prestarted 1-GPU study of three configs under `policy`."""
    (folder / "quietexp.py").write_text(EXPERIMENT)
    study = {
        "name": f"quiet-{policy}",
        "function": "quietexp:run",
        "virtual_gpus": 1,
        "gpus_per_experiment": 1,
        "prestart": True,
        "experiment_gap_s": 0.05,
        "prepare_during_measurement": policy,
        "timeout_s": 120,
        "base": {"work_s": WORK_S},
        "configs": [{"i": i, "prepare_steps": n} for i, n in enumerate(PREPARE_STEPS)],
        **(header or {}),
    }
    path = folder / "study.yaml"
    path.write_text(json.dumps(study, indent=1))  # JSON is YAML
    return path


def records(out: Path) -> list[dict[str, Any]]:
    """The study's records, by experiment number."""
    found = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    return sorted(found, key=lambda r: r["config"]["i"])


def progress_inside(done: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, int]]:
    """(window's experiment, neighbour, stamps) for each neighbour's progress inside a window."""
    found = []
    for run in done:
        data = run["result"]["data"]
        for other in done:
            if other is run:
                continue
            stamps = other["result"]["data"]["progress"]
            inside = sum(1 for t in stamps if data["work_start"] <= t <= data["work_end"])
            if inside:
                found.append((data["i"], other["result"]["data"]["i"], inside))
    return found


def frozen_then_resumed(done: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """(window's experiment, neighbour) where the neighbour progressed before the window,
    not inside it, and again after it: a preparation paused for that window."""
    found = []
    for run in done:
        data = run["result"]["data"]
        for other in done:
            stamps = other["result"]["data"]["progress"] if other is not run else []
            before = any(t < data["work_start"] for t in stamps)
            inside = any(data["work_start"] <= t <= data["work_end"] for t in stamps)
            after = any(t > data["work_end"] for t in stamps)
            if before and after and not inside:
                found.append((data["i"], other["result"]["data"]["i"]))
    return found


def check_quiet(done: Sequence[Mapping[str, Any]], policy: str) -> None:
    """What each policy promises, from the experiments' own stamps and the records."""
    assert len(done) == len(PREPARE_STEPS), done
    assert all(r["status"] == "succeeded" for r in done), [r.get("error") for r in done]
    assert [r["prestarted"] for r in done][1:] == [True, True]
    for run in done:
        assert run["isolation"] == policy
        for name in ("window_prepare_overlap_s", "window_work_overlap_s", "neighbours_paused_s"):
            assert isinstance(run[name], float), (name, run[name])
    if policy == "pause":
        assert progress_inside(done) == []
        assert frozen_then_resumed(done), "no preparation was paused by a window"
        assert not any(r["window_disturbed"] for r in done)
        assert max(r["neighbours_paused_s"] for r in done) > 0.3
    else:
        assert progress_inside(done), "nothing prepared inside a window: no control"
        assert any(r["window_disturbed"] for r in done)
        assert max(r["window_prepare_overlap_s"] for r in done) > 0.1
        assert all(r["neighbours_paused_s"] == 0 for r in done)


CORES_EXPERIMENT = (
    "import os, time\n"
    "def run(config):\n"
    "    start = time.time()\n"
    "    time.sleep(0.3)\n"
    "    status = open('/proc/self/status').read().splitlines()\n"
    "    allowed = [l.split(':', 1)[1].strip() for l in status\n"
    "               if l.startswith('Cpus_allowed_list')][0]\n"
    "    return {'allowed': allowed, 'start': start, 'end': time.time(),\n"
    "            'omp': os.environ.get('OMP_NUM_THREADS')}\n"
)


def write_cores_study(folder: Path, **extra: Any) -> Path:
    """Four 1-GPU experiments on 2 virtual GPUs, one core per GPU, reporting their cores."""
    (folder / "cores.py").write_text(CORES_EXPERIMENT)
    study = {
        "name": "cores",
        "function": "cores:run",
        "virtual_gpus": 2,
        "gpus_per_experiment": 1,
        "cpus_per_gpu": 1,
        "grid": {"i": [0, 1, 2, 3]},
        **extra,
    }
    path = folder / "study.yaml"
    path.write_text(json.dumps(study, indent=1))
    return path
