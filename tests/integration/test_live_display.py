"""The live `run` display as a person sees it: under a pseudo-terminal, local runner.

No Docker needed: the experiments are host subprocesses (`--runner local`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_in_pty

pytestmark = pytest.mark.slow

EXPERIMENT = """
import os, time
def run(config):
    time.sleep(config["sleep"])
    if config["i"] % 4 == 0 and not os.path.exists(config["flag"]):
        raise RuntimeError("fails until the flag file exists")
    return {"value": config["i"] * 1.5}
"""


def study(tmp_path: Path) -> Path:
    (tmp_path / "exp.py").write_text(EXPERIMENT)
    path = tmp_path / "study.yaml"
    path.write_text(
        f"""name: live
function: exp:run
virtual_gpus: 2
gpus_per_experiment: 1
base: {{sleep: 0.6, flag: "{tmp_path / "flag"}"}}
grid:
  i: [0, 1, 2, 3, 4, 5, 6, 7]
"""
    )
    return path


def test_live_display_counts_eta_and_resume_reach_the_total(tmp_path: Path) -> None:
    path = study(tmp_path)
    out = tmp_path / "out"
    code, screen = run_in_pty("run", str(path), "--runner", "local", "--results", str(out))
    assert code == 1, screen[-3000:]  # two experiments failed
    assert "━" in screen, "the bar is drawn"
    assert "GPU 0" in screen
    assert "GPU 1" in screen
    assert re.search(r"GPU 0\s+[0-9a-f]{16}_c1\s+\d+\.\ds", screen), "a GPU line names its run"
    # Each number before its word: never "done 6 failed 2", which reads as "6 failed".
    assert "6 done · 2 failed · 0 running · 0 queued" in screen
    etas = set(re.findall(r"ETA (\d+:\d\d:\d\d)", screen))
    assert len(etas) >= 2, f"the ETA moves: {etas}"
    assert "8/8" in screen

    (tmp_path / "flag").touch()
    code, screen = run_in_pty(
        "run", str(path), "--runner", "local", "--results", str(out), "--resume"
    )
    assert code == 0, screen[-3000:]
    assert "6 skipped (done before)" in screen
    assert re.search(r"━+ 6/8", screen), "the resumed bar starts at what was done"
    assert "8/8" in screen, "a resumed study's bar completes"
    assert "2 done · 0 failed · 0 running · 0 queued · 6 skipped" in screen
    assert "2 succeeded, 0 failed, 0 errors, 6 skipped" in screen
