"""A second Ctrl-C sets the study's own force-kill switch, which its runners act on at once.

The local runner, through `llem-dispatch run`: experiments that ignore SIGTERM keep
their stop grace (60 s) after one Ctrl-C, and are killed at once after a second.
Also the switch itself: owned by a study, current only inside it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from llem_dispatch.runners import ForceKill, current_force_kill, force_kill_requested
from llem_dispatch.study import Study, StudyRequest, run_study
from llem_dispatch.testing import FakeRunner


def _started(out: Path) -> int:
    path = out / "journal.jsonl"
    if not path.exists():
        return 0
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(e["event"] == "started" for e in events)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_second_ctrl_c_kills_local_runs_without_their_grace(tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: forced\nrunner: local\nvirtual_gpus: 2\ngpus_per_experiment: 1\n"
        "stop_grace_s: 60\ncommand: [sh, -c, \"trap '' TERM; sleep 300\"]\n"
        "grid: {x: [1, 2]}\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"}
    argv = ["run", str(study), "--plain", "--results", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llem_dispatch", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        with anyio.fail_after(60):
            while _started(out) < 2:
                assert proc.poll() is None, proc.communicate()[0]
                await anyio.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        await anyio.sleep(2)
        assert proc.poll() is None, "one Ctrl-C: the runs keep their grace"
        proc.send_signal(signal.SIGINT)
        forced = time.monotonic()
        proc.wait(timeout=30)
        took = time.monotonic() - forced
        text = proc.communicate()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, text
    assert took < 10, f"exited {took:.1f}s after the second Ctrl-C"
    assert "forcing" in text


async def test_a_study_owns_its_switch_and_makes_it_current(tmp_path: Path) -> None:
    switch = ForceKill()
    seen: list[bool] = []

    def handler(config: dict[str, object], gpus: object) -> dict[str, object]:
        seen.append(current_force_kill() is switch)
        return {"ok": True}

    study = Study.model_validate({"grid": {"x": [1, 2]}})
    request = StudyRequest(study, tmp_path / "o", runner=FakeRunner(handler), force_kill=switch)
    summary = await run_study(request)
    assert summary.succeeded == 2
    assert seen == [True, True]
    # Outside the study: the process-wide switch, untouched by the study's.
    assert current_force_kill() is not switch
    switch.set()
    assert not force_kill_requested()


async def test_setting_the_switch_wakes_its_waiters_at_once() -> None:
    switch = ForceKill()
    woke: list[float] = []

    async def waiter() -> None:
        await switch.wait()
        woke.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        tg.start_soon(waiter)
        await anyio.sleep(0.05)
        assert woke == []
        switch.set()
        at = anyio.current_time()
    assert len(woke) == 2
    assert max(woke) - at < 0.05
    await switch.wait()  # already set: returns at once


def test_the_keyword_form_and_the_request_are_the_same_call(tmp_path: Path) -> None:
    study = Study.model_validate({"grid": {"x": [1]}})
    request = StudyRequest.of(study, str(tmp_path), resume=True, study_dir=str(tmp_path))
    assert (request.results_dir, request.resume, request.study_dir) == (tmp_path, True, tmp_path)
    with pytest.raises(TypeError, match="give every option in the StudyRequest"):
        anyio.run(lambda: run_study(request, tmp_path))
