"""`llem-dispatch run` on an adaptive study (local runner, real processes): the noisy
config is named unresolved at the end and in summary.json; `results --stats` agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "llem_dispatch.cli"]
SCRIPT = (
    "import json, os, random\n"
    "config = json.load(open(os.environ['LLEM_CONFIG_PATH']))\n"
    "value = 100.0 if config['kind'] == 'flat' else random.gauss(100.0, 50.0)\n"
    "json.dump({'v': value}, open(os.environ['LLEM_RESULT_PATH'], 'w'))\n"
)


def test_run_names_the_unresolved_config_and_stats_agree(tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(
        f"name: adaptive-cli\ncommand: [{json.dumps(sys.executable)}, -c, {json.dumps(SCRIPT)}]\n"
        "virtual_gpus: 1\ngpus_per_experiment: 1\ntimeout_s: 60\n"
        "n_cycles: {min: 2, max: 4, until: {field: v, rel_ci95: 0.01}}\n"
        "grid:\n  kind: [flat, noisy]\n"
    )
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    run = subprocess.run(
        [*CLI, "run", str(study), "--results", str(out), "--runner", "local", "--plain"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("unresolved:")]
    assert len(lines) == 1, run.stdout
    assert '{"kind": "noisy"}' in lines[0]
    assert "after 4 cycles" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total"] == 6, "flat: 2 cycles, noisy: 4"
    assert [u["config"] for u in summary["unresolved"]] == [{"kind": "noisy"}]
    stats = subprocess.run(
        [*CLI, "results", str(out), "--stats", "--format", "jsonl"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    rows = {r["param.kind"]: r for r in map(json.loads, stats.stdout.splitlines())}
    assert (rows["flat"]["n"], rows["noisy"]["n"]) == (2, 4)
    assert rows["flat"]["result.v_ci95"] == 0.0
    assert rows["noisy"]["result.v_ci95"] == summary["unresolved"][0]["ci95"]
