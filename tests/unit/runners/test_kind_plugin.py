"""A runner kind from another distribution runs a whole study through `llem-dispatch run`.

tests/plugins/llem_echo_runner is a distribution of its own; its entry point
(`llem_dispatch.runners`: echo) is found through a dist-info made from its
pyproject.toml in a temporary folder put on PYTHONPATH, so nothing is installed
into the environment and nothing is left behind. Its runner is the local
subprocess runner's machinery: no Docker is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.plugin_site import install_plugin

REPO = Path(__file__).resolve().parents[3]
PLUGIN = REPO / "tests" / "plugins" / "llem_echo_runner"

pytestmark = pytest.mark.slow


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI that finds the echo kind (and no Docker daemon)."""
    site = install_plugin(PLUGIN, tmp_path / "site")
    path = [str(site), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    env = {k: v for k, v in os.environ.items() if k != "LLEM_RUNNER"}
    # Nothing here may ask the machine's daemon: a socket nobody listens on.
    env["DOCKER_HOST"] = f"unix://{tmp_path}/no-daemon.sock"
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llem_dispatch", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env=env,
    )


def _journal(out: Path) -> list[dict[str, Any]]:
    lines = (out / "journal.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _study(tmp_path: Path, runner: str = "echo") -> Path:
    (tmp_path / "exp.py").write_text(
        "import os\n\ndef run(config):\n"
        "    return {'x': config['x'], 'gpus': os.environ['CUDA_VISIBLE_DEVICES']}\n"
    )
    study = tmp_path / "study.yaml"
    study.write_text(
        f"name: echo\nrunner: {runner}\nfunction: exp:run\nvirtual_gpus: 2\n"
        "gpus_per_experiment: 1\n"
        "grid: {x: [1, 2, 3]}\n"
    )
    return study


def test_a_kind_from_another_distribution_runs_a_study(
    tmp_path: Path, plugin_env: dict[str, str]
) -> None:
    study = _study(tmp_path)
    out = tmp_path / "out"
    proc = _cli(plugin_env, "run", str(study), "--results", str(out), "--plain")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert json.loads((out / "study.json").read_text())["runner"] == "echo"
    records = {p: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    assert len(records) == 3
    assert {r["runner_type"] for r in records.values()} == {"echo"}
    runner_facts = [r["result"]["runner"] for r in records.values()]
    assert {f["runner_type"] for f in runner_facts} == {"echo"}
    assert {f["runner_source"] for f in runner_facts} == {"study"}
    assert sorted(r["result"]["data"]["x"] for r in records.values()) == [1, 2, 3]
    for record in records.values():
        # A host process is handed its GPU by visibility variables only.
        assert record["gpu_ids"] in (["0"], ["1"])
        assert record["result"]["data"]["gpus"] == record["gpu_ids"][0]
    events = _journal(out)
    assert [e["runner"] for e in events if e["event"] == "study_started"] == ["echo"]
    assert len({e["key"] for e in events if e["event"] == "succeeded"}) == 3

    # --resume: everything succeeded, so nothing runs again and no record is rewritten.
    written = {p: p.stat().st_mtime_ns for p in records}
    again = _cli(plugin_env, "run", str(study), "--results", str(out), "--plain", "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    events = _journal(out)
    starts = [e for e in events if e["event"] == "study_started"]
    assert [(s["todo"], s["skipped"]) for s in starts] == [(3, 0), (0, 3)]
    ran = Counter(e["key"] for e in events if e["event"] in {"started", "succeeded"})
    assert set(ran.values()) == {2}, "each experiment started and succeeded once, in the first run"
    assert {p: p.stat().st_mtime_ns for p in records} == written


def test_doctor_lists_the_kind_and_needs_no_daemon_for_it(
    tmp_path: Path, plugin_env: dict[str, str]
) -> None:
    proc = _cli(plugin_env, "doctor", str(_study(tmp_path)))
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "echo (llem-echo-runner)" in text
    assert "PASS runner echo: runs experiments as host processes" in text
    # The study runs on echo: doctor shows that kind's lines, nothing of Docker's.
    assert "Docker" not in text
    assert "NVIDIA" not in text


def test_a_misspelt_kind_names_the_registered_ones(
    tmp_path: Path, plugin_env: dict[str, str]
) -> None:
    proc = _cli(plugin_env, "run", str(_study(tmp_path, runner="ecoh")), "--dry-run")
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, text
    assert "study.yaml:2" in text, "the error names the line of `runner:`"
    assert "did you mean 'echo'?" in text
    assert "docker, echo, local" in text
