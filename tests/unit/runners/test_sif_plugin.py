"""An image runner kind from another distribution: `.sif` file images, Apptainer's form.

tests/plugins/llem_sif_runner is a distribution of its own; its entry point
(`llem_dispatch.runners`: sif) is found through a dist-info made from its
pyproject.toml in a temporary folder put on PYTHONPATH (as for the echo plugin).
Each experiment runs as `fakeapptainer exec --nv IMAGE.sif CMD...`: a stand-in
CLI shipped in the plugin, no real Apptainer. The kind owns its images (their
references, presence and doctor lines), so nothing asks Docker: the CLI runs
with DOCKER_HOST and LLEM_ENGINE_URL on a socket nobody listens on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.plugin_site import install_plugin

REPO = Path(__file__).resolve().parents[3]
PLUGIN = REPO / "tests" / "plugins" / "llem_sif_runner"

pytestmark = pytest.mark.slow


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI that finds the sif kind, and no container engine at all."""
    site = install_plugin(PLUGIN, tmp_path / "site")
    path = [str(site), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    env = {k: v for k, v in os.environ.items() if k != "LLEM_RUNNER"}
    dead = f"unix://{tmp_path}/no-engine.sock"
    env["DOCKER_HOST"] = dead
    env["LLEM_ENGINE_URL"] = dead
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    env["COLUMNS"] = "200"
    return env


@pytest.fixture
def sif_kind() -> Iterator[Any]:
    """The plugin's kind class, imported in this process (not registered)."""
    sys.path.insert(0, str(PLUGIN))
    try:
        from llem_sif_runner import SifRunnerKind

        yield SifRunnerKind("sif")
    finally:
        sys.path.remove(str(PLUGIN))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llem_dispatch", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env=env,
    )


def _study(tmp_path: Path, image: str = "images/bench.sif", *, make: bool = True) -> Path:
    """A three-experiment study on `runner: sif`; `image` on line 3, made unless `make`."""
    if make:
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / "bench.sif").write_bytes(b"SIF stand-in image\n")
    (tmp_path / "exp.py").write_text(
        "import os\n\ndef run(config):\n"
        "    return {'x': config['x'], 'inside': os.environ.get('APPTAINER_CONTAINER'),\n"
        "            'gpus': os.environ['CUDA_VISIBLE_DEVICES']}\n"
    )
    study = tmp_path / "study.yaml"
    study.write_text(
        f"name: sif\nrunner: sif\nimage: {image}\nfunction: exp:run\nvirtual_gpus: 2\n"
        "gpus_per_experiment: 1\ngrid: {x: [1, 2, 3]}\n"
    )
    return study


def _text(proc: subprocess.CompletedProcess[str]) -> str:
    return " ".join((proc.stdout + proc.stderr).split())


def _journal(out: Path) -> list[dict[str, Any]]:
    lines = (out / "journal.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_a_whole_study_runs_in_its_sif_image_and_resumes(
    tmp_path: Path, plugin_env: dict[str, str]
) -> None:
    study = _study(tmp_path)
    image = str((tmp_path / "images" / "bench.sif").resolve())
    out = tmp_path / "out"
    proc = _cli(plugin_env, "run", str(study), "--results", str(out), "--plain")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert json.loads((out / "study.json").read_text())["runner"] == "sif"
    records = {p: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    assert len(records) == 3
    assert {r["runner_type"] for r in records.values()} == {"sif"}
    assert {r["image"] for r in records.values()} == {image}
    for record in records.values():
        data = record["result"]["data"]
        # It ran inside the image, through `fakeapptainer exec --nv IMAGE.sif`.
        assert data["inside"] == image
        assert data["gpus"] == record["gpu_ids"][0]
    assert sorted(r["result"]["data"]["x"] for r in records.values()) == [1, 2, 3]

    # --resume: everything succeeded, so nothing runs again and no record is rewritten.
    written = {p: p.stat().st_mtime_ns for p in records}
    again = _cli(plugin_env, "run", str(study), "--results", str(out), "--plain", "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    starts = [e for e in _journal(out) if e["event"] == "study_started"]
    assert [(s["todo"], s["skipped"]) for s in starts] == [(3, 0), (0, 3)]
    ran = Counter(e["key"] for e in _journal(out) if e["event"] in {"started", "succeeded"})
    assert set(ran.values()) == {2}, "each experiment started and succeeded once"
    assert {p: p.stat().st_mtime_ns for p in records} == written


def test_a_missing_sif_is_refused_before_anything_runs(
    tmp_path: Path, plugin_env: dict[str, str]
) -> None:
    study = _study(tmp_path, "images/absent.sif", make=False)
    out = tmp_path / "out"
    proc = _cli(plugin_env, "run", str(study), "--results", str(out), "--plain")
    text = _text(proc)
    assert proc.returncode == 2, text
    assert "'images/absent.sif': no such .sif file; nothing was run" in text
    assert "apptainer build" in text
    assert "Docker" not in text
    assert "Traceback" not in text
    assert not out.exists(), "nothing started, no results written"


def test_dry_run_shows_the_apptainer_command_line(
    tmp_path: Path, plugin_env: dict[str, str]
) -> None:
    proc = _cli(plugin_env, "run", str(_study(tmp_path)), "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = _text(proc)
    assert "runner: sif (chosen by: study)" in text
    argv = [line.strip().rstrip(",").strip('"') for line in proc.stdout.splitlines()]
    image = str((tmp_path / "images" / "bench.sif").resolve())
    start = argv.index("exec")
    assert argv[start - 1].endswith("fakeapptainer.py")
    assert argv[start : start + 3] == ["exec", "--nv", image]
    # Then the experiment's own command: the helper running `function: exp:run`.
    assert argv[start + 4].endswith("container.py")
    assert argv[start + 5] == "exp:run"


def test_doctor_gives_the_kinds_own_lines_and_nothing_of_dockers(
    tmp_path: Path, plugin_env: dict[str, str]
) -> None:
    study = _study(tmp_path)
    proc = _cli(plugin_env, "doctor", str(study))
    text = _text(proc)
    assert proc.returncode == 0, text
    assert "sif (llem-sif-runner)" in text
    assert "PASS runner sif: fakeapptainer at" in text
    image = (tmp_path / "images" / "bench.sif").resolve()
    assert f"PASS image {image}: present (.sif file)" in text
    assert "Docker" not in text
    assert "NVIDIA container runtime" not in text
    (tmp_path / "images" / "bench.sif").unlink()
    missing = _cli(plugin_env, "doctor", str(study))
    assert missing.returncode == 1, _text(missing)
    assert f"FAIL image {image}: no such .sif file" in _text(missing)


@pytest.mark.parametrize(
    ("image", "problem"),
    [("bench.img", "'bench.img' is not a .sif image file"), ("bench-sif:1", "ending in .sif")],
)
def test_a_bad_reference_is_refused_at_its_line_by_the_kind(
    tmp_path: Path, plugin_env: dict[str, str], image: str, problem: str
) -> None:
    proc = _cli(plugin_env, "run", str(_study(tmp_path, image, make=False)), "--dry-run")
    text = _text(proc)
    assert proc.returncode == 2, text
    assert "study.yaml:3: image:" in text, "the error names the line and the field"
    assert problem in text
    assert "not a valid image reference" not in text, "Docker's check is not the kind's"


def test_a_sif_path_is_no_image_for_docker(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    """The same study pointed at Docker is refused by Docker's check, with the fix."""
    _study(tmp_path)
    study = _study(tmp_path, str(tmp_path / "images" / "bench.sif"), make=False)
    proc = _cli(plugin_env, "run", str(study), "--runner", "docker", "--dry-run")
    text = _text(proc)
    assert proc.returncode == 2, text
    assert "cannot run on the docker runner" in text
    assert "not a valid image reference" in text


def test_references_and_presence_belong_to_the_kind(tmp_path: Path, sif_kind: Any) -> None:
    assert sif_kind.check_image("images/bench.sif") == "images/bench.sif"
    assert sif_kind.check_image("/abs/bench.sif") == "/abs/bench.sif"
    with pytest.raises(ValueError, match=r"ending in \.sif"):
        sif_kind.check_image("bench:1")
    (tmp_path / "here.sif").write_bytes(b"x")
    absolute = tmp_path / "abs.sif"
    absolute.write_bytes(b"x")
    images = ["here.sif", "gone.sif", str(absolute), str(tmp_path / "gone-too.sif")]
    missing = anyio.run(lambda: sif_kind.missing_images(images, study_dir=tmp_path))
    assert missing == ["gone.sif", str(tmp_path / "gone-too.sif")]
    assert sif_kind.resolve_image("here.sif", tmp_path) == str(tmp_path / "here.sif")
