"""What the CLI prints is the text it was given: no brackets lost to rich markup,
and a reader that goes away (`| head`) ends the printing, never the study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from llem_dispatch import errors
from llem_dispatch.cli.app import fail_usage, make_console

REPO_ROOT = Path(__file__).resolve().parents[3]
CLI = [sys.executable, "-m", "llem_dispatch.cli"]
BRACKETS = "[analysis] [bold]x[/] [/] [red] [link=http://x]y[/link]"


def _all_error_classes() -> Iterator[type[errors.LlemError]]:
    seen: set[type[errors.LlemError]] = set()
    todo = [errors.LlemError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo.extend(cls.__subclasses__())
    yield from sorted(seen, key=lambda c: c.__name__)


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("cls", list(_all_error_classes()), ids=lambda c: c.__name__)
def test_every_error_class_fix_comes_out_of_the_cli_unchanged(
    cls: type[errors.LlemError], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "2000")
    fix = cls.default_fix
    assert fix
    exit_ = fail_usage(f"{cls.__name__} in {BRACKETS}", fix)
    assert isinstance(exit_, typer.Exit)
    err = capsys.readouterr().err
    assert _flat(f"fix: {fix}") in _flat(err)
    assert _flat(f"{cls.__name__} in {BRACKETS}") in _flat(err)


def test_console_prints_brackets_literally(capsys: pytest.CaptureFixture[str]) -> None:
    make_console().print(f"detail {BRACKETS}")
    assert capsys.readouterr().out.strip() == f"detail {BRACKETS}"


def test_report_without_the_analysis_extra_names_the_extra(tmp_path: Path) -> None:
    # pandas and plotly that fail to import, as on an install without the extra.
    blocked = tmp_path / "blocked"
    for name in ("pandas", "plotly"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text("raise ImportError('not installed')\n")
    results = tmp_path / "results"
    (results / "records").mkdir(parents=True)
    (results / "journal.jsonl").write_text("")
    env = {**os.environ, "PYTHONPATH": f"{blocked}:{REPO_ROOT / 'src'}", "COLUMNS": "300"}
    proc = subprocess.run(
        [*CLI, "report", str(results)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'llem-dispatch[report]'" in proc.stderr


def test_a_closed_stdout_does_not_end_the_study(tmp_path: Path) -> None:
    """`llem-dispatch run ... | head -1`: the study runs to the end, exit 0, one warning."""
    study = tmp_path / "study.yaml"
    script = 'sleep 0.2; echo "{\\"i\\": 1}" > "$LLEM_RESULT_PATH"'
    study.write_text(
        f"name: pipe\ncommand: [sh, -c, {json.dumps(script)}]\nvirtual_gpus: 2\n"
        "gpus_per_experiment: 1\ntimeout_s: 60\ngrid:\n  i: [0, 1, 2, 3, 4, 5, 6, 7]\n"
    )
    out = tmp_path / "results"
    proc = subprocess.Popen(
        [*CLI, "run", str(study), "--results", str(out), "--runner", "local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline()  # the first line came; the reader goes away
    proc.stdout.close()
    try:
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    text = stderr.decode()
    assert proc.returncode == 0, text
    assert "stdout_closed" in text
    assert "Traceback" not in text
    assert "BrokenPipe" not in text
    records = list((out / "records").glob("*.json"))
    assert len(records) == 8
    journal = (out / "journal.jsonl").read_text()
    assert "BrokenPipe" not in journal
    assert '"study_finished"' in journal
