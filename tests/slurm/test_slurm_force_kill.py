"""Ctrl-C on a Slurm study: once, its jobs stop within their grace; twice, they end at once.

On the real single-node Slurm of `.ci/setup-slurm.sh` (its `KillWait` is 5 s): each
experiment ignores SIGTERM, so only its runner's SIGKILL after `stop_grace_s` (or a
forced stop) ends it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from tests.slurm.conftest import journal, records, run_argv, squeue_jobs, study_dict, write_study

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

#: The study's stop grace: far longer than anything the test waits for.
GRACE_S = 60.0
#: After the second Ctrl-C, the jobs are gone from the queue within this.
GONE_WITHIN_S = 5.0
#: Jobs still running this long after the first Ctrl-C are in their grace (past
#: Slurm's own KillWait of 5 s, which an outright `scancel` would have ended them at).
STILL_THERE_S = 7.0


@pytest.mark.timeout(240)
async def test_a_second_ctrl_c_kills_every_job_of_the_study_at_once(
    tmp_path: Path, study_name: str
) -> None:
    data = study_dict(
        study_name,
        3,
        command=["sh", "-c", "trap '' TERM; sleep 300"],
        stop_grace_s=GRACE_S,
    )
    out = tmp_path / "out"
    prefix = f"llem-{study_name}"
    proc = subprocess.Popen(
        run_argv(write_study(tmp_path / "study.yaml", data), out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with anyio.fail_after(120):
            # Each experiment has begun (the driver journalled its started.json).
            while sum(e["event"] == "started" for e in _journal(out)) < 3:
                assert proc.poll() is None, f"the CLI exited with {proc.returncode}"
                await anyio.sleep(0.3)
        jobs = {j for j, (name, _) in squeue_jobs(prefix).items() if not name.endswith("-check")}
        assert len(jobs) == 3

        proc.send_signal(signal.SIGINT)
        await anyio.sleep(STILL_THERE_S)
        states = {j: state for j, (_, state) in squeue_jobs(prefix).items() if j in jobs}
        assert states == dict.fromkeys(jobs, "RUNNING"), "asked to stop, each keeps its grace"
        assert proc.poll() is None

        proc.send_signal(signal.SIGINT)
        forced = time.monotonic()
        while jobs & set(squeue_jobs(prefix)) and time.monotonic() - forced < 30:
            await anyio.sleep(0.1)
        gone_after = time.monotonic() - forced
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the CLI did not exit within 30 s of the second Ctrl-C")
        exited_after = time.monotonic() - forced
        text = proc.communicate()[0] or ""
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\njobs gone {gone_after:.1f}s, CLI exited {exited_after:.1f}s after the 2nd Ctrl-C")
    assert gone_after < GONE_WITHIN_S, f"jobs left the queue {gone_after:.1f}s after it"
    assert proc.returncode == 130, text
    assert "forcing" in text, text
    assert "clean-up did not finish" not in text, text
    assert squeue_jobs(prefix) == {}
    assert journal(out)[-1]["event"] == "interrupted"
    assert records(out) == {}


def _journal(out: Path) -> list[dict[str, object]]:
    return journal(out) if (out / "journal.jsonl").exists() else []
