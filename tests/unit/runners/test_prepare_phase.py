"""The prepare phase and the gate's timing: the helper, the marks, the shell gate, phases."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from llem_dispatch import container
from llem_dispatch._exchange import ExchangeDir
from llem_dispatch.errors import ConfigError
from llem_dispatch.runners._gate import GATE_ENTRYPOINT, gated_argv, gated_spec, image_argv
from llem_dispatch.runners._phases import phase_times


@pytest.fixture
def protocol_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The helper's environment in tmp_path: config, result, marks and go paths."""
    (tmp_path / "c_config.json").write_text(json.dumps({"x": 1}))
    for name, value in {
        "LLEM_CONFIG_PATH": tmp_path / "c_config.json",
        "LLEM_RESULT_PATH": tmp_path / "c_result.json",
        "LLEM_MARKS_PATH": tmp_path / "marks.jsonl",
        "LLEM_GO_PATH": tmp_path / "go",
    }.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _module(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))
    sys.modules.pop(name, None)


def _marks(folder: Path) -> dict[str, float]:
    lines = (folder / "marks.jsonl").read_text().splitlines()
    return {entry["mark"]: entry["t"] for entry in map(json.loads, lines)}


def test_a_generator_prepares_before_the_gate_and_works_after_it(protocol_env: Path) -> None:
    _module(
        protocol_env,
        "gen_ok",
        """
        import os, time

        def run(config):
            prepared_at = time.time()
            yield
            assert os.path.exists(os.environ["LLEM_GO_PATH"]), "resumed before the gate"
            yield
            return {"prepared_at": prepared_at, "x": config["x"]}
        """,
    )
    codes: list[int] = []
    helper = threading.Thread(
        target=lambda: codes.append(container.main(["gen_ok:run"])), daemon=True
    )
    helper.start()
    deadline = time.monotonic() + 10
    # The prepare part ran and the helper is waiting at its gate: the `ready` mark.
    while not (protocol_env / "marks.jsonl").exists() or "ready" not in _marks(protocol_env):
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.005)
    assert not (protocol_env / "c_result.json").exists()
    assert helper.is_alive()
    (protocol_env / "go").touch()
    helper.join(10)
    assert codes == [0]
    result = json.loads((protocol_env / "c_result.json").read_text())
    marks = _marks(protocol_env)
    assert marks["start"] <= result["prepared_at"] <= marks["ready"] <= marks["go"] <= marks["work"]
    assert marks["work"] <= marks["done"]  # returned: the cooldown may count from here
    assert result["x"] == 1


def test_a_plain_function_is_still_called_after_the_gate(protocol_env: Path) -> None:
    _module(protocol_env, "plain_ok", "def run(config):\n    return {'ok': True}\n")
    (protocol_env / "go").touch()
    assert container.main(["plain_ok:run"]) == 0
    assert set(_marks(protocol_env)) == {"start", "ready", "go", "done"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("def run(config):\n    return {}\n    yield\n", "returned before its first `yield`"),
        ("def run(config):\n    yield\n    yield\n    yield\n", "yielded more than twice"),
    ],
)
def test_a_generator_that_breaks_the_protocol_is_an_error(
    protocol_env: Path, body: str, message: str
) -> None:
    name = f"gen_bad_{abs(hash(body))}"
    _module(protocol_env, name, body)
    (protocol_env / "go").touch()
    assert container.main([f"{name}:run"]) == container.EXIT_FAILURE
    error = json.loads((protocol_env / "c_error.json").read_text())
    assert error["type"] == "TypeError"
    assert message in error["message"]


def test_marks_are_read_first_of_each_name_and_malformed_lines_skipped(tmp_path: Path) -> None:
    exchange = ExchangeDir(tmp_path, "c")
    (tmp_path / ".llem-marks.jsonl").write_text(
        '{"mark": "start", "t": 1.0}\nnot json\n{"mark": "work", "t": "x"}\n'
        '{"mark": "ready", "t": 2, "rss_bytes": 10}\n{"mark": "start", "t": 9.0}\n'
    )
    assert exchange.read_marks() == {
        "start": {"mark": "start", "t": 1.0},
        "ready": {"mark": "ready", "t": 2.0, "rss_bytes": 10},
    }
    assert "LLEM_MARKS_PATH" in exchange.env("/run/llem")


def test_a_marks_link_reads_as_no_marks(tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    outside.write_text('{"mark": "start", "t": 1.0}\n')
    inside = tmp_path / "x"
    inside.mkdir()
    os.symlink(outside, inside / ".llem-marks.jsonl")
    assert ExchangeDir(inside, "c").read_marks() == {}


def test_phases_of_a_prestarted_run() -> None:
    marks = {
        "start": {"t": 100.0},
        "ready": {"t": 103.0, "rss_bytes": 2048},
        "go": {"t": 110.01},
        "work": {"t": 110.5},
        "done": {"t": 130.0},
    }
    phases = phase_times(marks, launched=99.5, gate=110.0)
    assert phases.prepare_s == pytest.approx(3.0)
    assert phases.gate_wait_s == pytest.approx(7.0)
    assert phases.gate_to_work_s == pytest.approx(0.5)
    assert phases.ready_rss_bytes == 2048
    assert phases.work_started_at is not None
    assert phases.work_started_at.timestamp() == pytest.approx(110.5)
    assert phases.work_ended_at is not None
    assert phases.work_ended_at.timestamp() == pytest.approx(130.0)


def test_phases_without_a_gate_or_marks() -> None:
    # Not prestarted: the GPUs were its own from the launch; no gate wait.
    phases = phase_times({"work": {"t": 12.0}}, launched=10.0, gate=None)
    assert (phases.prepare_s, phases.gate_wait_s, phases.gate_to_work_s) == (None, None, 2.0)
    # A command run behind the shell gate leaves no marks: it waited from its launch.
    shell = phase_times({}, launched=10.0, gate=13.5)
    assert (shell.prepare_s, shell.gate_wait_s, shell.gate_to_work_s) == (None, 3.5, None)


def test_the_image_command_runs_unchanged_behind_the_gate() -> None:
    image = {"Entrypoint": ["/entry", "-v"], "Cmd": ["serve", "--port", "1"]}
    assert image_argv(image, None) == ["/entry", "-v", "serve", "--port", "1"]
    # A study's command replaces the image's Cmd, never its Entrypoint (as docker run).
    assert image_argv(image, ["other"]) == ["/entry", "-v", "other"]
    spec = gated_spec(image, None)
    assert spec["Entrypoint"] == list(GATE_ENTRYPOINT)
    assert spec["Cmd"] == ["/entry", "-v", "serve", "--port", "1"]
    assert gated_argv(["a b", "$c"])[-2:] == ["a b", "$c"]


def test_an_empty_command_cannot_be_gated() -> None:
    with pytest.raises(ConfigError, match="nothing to run behind the prestart gate"):
        gated_spec({"Entrypoint": None, "Cmd": None}, None)


def test_the_shell_gate_waits_for_the_go_file_then_execs(tmp_path: Path) -> None:
    import subprocess

    go = tmp_path / "go"
    out = tmp_path / "out"
    argv = gated_argv(["/bin/sh", "-c", 'echo "$0 $1" > "$2"', "one", "two words", str(out)])
    process = subprocess.Popen(argv, env={**os.environ, "LLEM_GO_PATH": str(go)})
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(0.3)  # held: no go file yet
        assert not out.exists()
        go.touch()
        assert process.wait(10) == 0
    finally:
        process.kill()
    assert out.read_text() == "one two words\n"


def test_a_gate_blocked_on_the_fifo_uses_no_cpu_and_wakes_at_once(tmp_path: Path) -> None:
    import resource
    import subprocess

    exchange = ExchangeDir(tmp_path, "c")
    exchange.hold_at_gate()
    env = {**os.environ, **exchange.env(str(tmp_path))}
    assert env["LLEM_GO_FIFO"].endswith(".llem-go.fifo")
    out = tmp_path / "out"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(gated_argv(["/bin/sh", "-c", f"echo ran > {out}"]), env=env)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            process.wait(1.0)  # held, blocked reading the FIFO
        assert not out.exists()
        exchange.open_gate()
        assert process.wait(10) == 0
    finally:
        process.kill()
        exchange.close_gate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # Polling the go file every 10 ms would take 0.06-0.09 s of CPU in that second.
    assert cpu < 0.03
    assert out.read_text() == "ran\n"


def test_a_gate_that_opens_the_fifo_late_still_finds_the_line(tmp_path: Path) -> None:
    exchange = ExchangeDir(tmp_path, "c")
    exchange.hold_at_gate()
    exchange.open_gate()  # before any reader: the line stays, the write end held
    try:
        with (tmp_path / ".llem-go.fifo").open("rb") as fifo:
            assert fifo.readline() == b"go\n"
    finally:
        exchange.close_gate()
    exchange.close_gate()  # idempotent
    assert (tmp_path / ".llem-go").exists()


def test_the_helper_waits_on_the_fifo(protocol_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _module(protocol_env, "fifo_ok", "def run(config):\n    return {'ok': True}\n")
    exchange = ExchangeDir(protocol_env, "c")
    exchange.hold_at_gate()
    monkeypatch.setenv("LLEM_GO_PATH", str(protocol_env / ".llem-go"))
    monkeypatch.setenv("LLEM_GO_FIFO", str(protocol_env / ".llem-go.fifo"))
    codes: list[int] = []
    helper = threading.Thread(
        target=lambda: codes.append(container.main(["fifo_ok:run"])), daemon=True
    )
    helper.start()
    try:
        deadline = time.monotonic() + 10
        while not (protocol_env / "marks.jsonl").exists() or "ready" not in _marks(protocol_env):
            assert time.monotonic() < deadline, "never became ready"
            time.sleep(0.005)
        helper.join(0.3)
        assert helper.is_alive()  # blocked at its gate
        exchange.open_gate()
        helper.join(10)
    finally:
        exchange.close_gate()
    assert codes == [0]
    assert "go" in _marks(protocol_env)
