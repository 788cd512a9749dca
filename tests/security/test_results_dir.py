"""The results dir as a careless or hostile user meets it: names, other people's files, two runs.

Each test here failed before the fix it guards (issue: hardening from an adversarial pass).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from llem_dispatch import ConfigError, ResultsDirBusyError, Study, load_study, run_study
from llem_dispatch.study import ResultsDir, completed_keys
from llem_dispatch.testing import FakeRunner


@pytest.mark.parametrize("name", ["..", "../../x", "/etc/llem", "", ".", "a/b", ".hidden"])
def test_unsafe_study_names_are_refused_with_the_rule(tmp_path: Path, name: str) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(f"name: {json.dumps(name)}\ngrid: {{x: [1]}}\n")
    with pytest.raises(ConfigError, match="safe directory name"):
        load_study(path)


def test_results_in_the_study_folder_is_refused_and_the_study_file_kept(tmp_path: Path) -> None:
    # name: ".." used to make the results dir the study's own folder and overwrite
    # study.yaml; pointing --results there directly must be refused as well.
    study_file = tmp_path / "study.yaml"
    original = "# my comments\nname: s\ngrid: {x: [1, 2]}\n"
    study_file.write_text(original)
    with pytest.raises(ConfigError, match="not an llem-dispatch results dir"):
        anyio.run(lambda: run_study(load_study(study_file), tmp_path, runner=FakeRunner()))
    assert study_file.read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_results_naming_a_file_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("not a dir")
    with pytest.raises(ConfigError, match="is a file"):
        ResultsDir.open(target, resume=False)
    assert target.read_text() == "not a dir"


def test_a_dir_refused_before_anything_ran_is_not_left_behind(tmp_path: Path) -> None:
    out = tmp_path / "new"
    study = Study.model_validate({"grid": {"x": [1]}, "gpus_per_experiment": 9})
    with pytest.raises(Exception, match="GPU"):
        anyio.run(lambda: run_study(study, out, runner=FakeRunner()))
    assert not out.exists()


async def test_second_run_on_a_held_results_dir_is_refused_at_once(tmp_path: Path) -> None:
    study = Study.model_validate({"grid": {"x": list(range(6))}, "max_concurrency": 2})
    out = tmp_path / "o"
    release = anyio.Event()
    started = anyio.Event()
    calls: list[int] = []

    async def held(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        started.set()
        await release.wait()
        calls.append(config["x"])
        return {"x": config["x"]}

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_study(study, out, runner=FakeRunner(held)))
        with anyio.fail_after(10):
            await started.wait()
        second = FakeRunner()
        with anyio.fail_after(5), pytest.raises(ResultsDirBusyError) as info:
            await run_study(study, out, runner=second, resume=True)
        assert f"pid {os.getpid()}" in info.value.message
        assert second.calls == []
        release.set()
    events = [
        json.loads(line)["event"] for line in (out / "journal.jsonl").read_text().splitlines()
    ]
    assert events.count("succeeded") == 6, "each experiment ran exactly once"
    assert sorted(calls) == list(range(6))


def test_a_killed_run_never_blocks_resume(tmp_path: Path) -> None:
    out = tmp_path / "o"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                from llem_dispatch.study import ResultsDir
                ResultsDir.open({str(out)!r}, resume=False)
                print("held", flush=True)
                time.sleep(60)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ResultsDirBusyError, match=f"pid {holder.pid}"):
            ResultsDir.open(out, resume=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        if holder.stdout is not None:
            holder.stdout.close()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process; bounded wait for that
        try:
            ResultsDir.open(out, resume=True).close()
            break
        except ResultsDirBusyError:
            assert time.monotonic() < deadline, "lock still held 10 s after SIGKILL"
            time.sleep(0.05)


async def test_journal_torn_last_line_does_not_swallow_the_next_event(tmp_path: Path) -> None:
    study = Study.model_validate({"grid": {"x": [1, 2]}})
    out = tmp_path / "o"
    await run_study(study, out, runner=FakeRunner())
    journal = out / "journal.jsonl"
    journal.write_bytes(journal.read_bytes() + b'{"ts": 1, "event": "succ')  # power loss
    (out / "records" / next(iter(completed_keys(out)))).with_suffix(".json").unlink()
    await run_study(study, out, runner=FakeRunner(), resume=True)
    lines = journal.read_text().splitlines()
    torn = [line for line in lines if line.endswith('"succ')]
    assert len(torn) == 1
    parsed = [json.loads(line) for line in lines if line not in torn]
    assert parsed[-1]["event"] == "study_finished"
    assert sum(e["event"] == "study_started" for e in parsed) == 2
