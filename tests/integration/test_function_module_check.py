"""A `function:` module beside the study file, run in an image that lacks it."""

from __future__ import annotations

from pathlib import Path

import pytest

from llem_dispatch import ConfigError, load_study, run_study
from tests.conftest import PYTHON_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leaked_containers")]


def write_study(tmp_path: Path, labels: dict[str, str], extra: str = "") -> Path:
    (tmp_path / "bench.py").write_text("def run(config):\n    return {'y': config['x'] * 2}\n")
    label_lines = "".join(f"\n  {k}: {v!r}" for k, v in labels.items())
    path = tmp_path / "study.yaml"
    path.write_text(
        f"name: modcheck\nimage: {PYTHON_IMAGE}\nfunction: bench:run\nvirtual_gpus: 1\n"
        f"network: none\nshm_size: 16m\nlabels:{label_lines}\ngrid: {{x: [1, 2]}}\n{extra}"
    )
    return path


async def test_missing_module_is_said_before_anything_runs(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    path = write_study(tmp_path, test_labels)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"module 'bench' is not importable in image") as info:
        await run_study(load_study(path), out, study_dir=tmp_path, runner_value="docker")
    assert "mount_study_dir: true" in info.value.fix_suggestion
    assert "COPY bench.py" in info.value.fix_suggestion
    assert not (out / "journal.jsonl").exists(), "nothing was run"


async def test_mount_study_dir_runs_it_for_development(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    path = write_study(tmp_path, test_labels, "mount_study_dir: true\n")
    summary = await run_study(
        load_study(path), tmp_path / "out", study_dir=tmp_path, runner_value="docker"
    )
    assert summary.succeeded == 2
    assert sorted(r.result["data"]["y"] for r in summary.records if r.result) == [2, 4]
