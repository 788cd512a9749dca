"""A placement from another distribution, with its own settings block, runs a whole study.

tests/plugins/llem_pool_placement is a distribution of its own: its entry point
(`llem_dispatch.placements`: procpool) is found through a dist-info made from its
pyproject.toml in a temporary folder put on the path, so nothing is installed into
the environment. It runs each attempt in a worker of a process pool, and takes
`procpool: {workers: N}`, which its own model validates when the study loads.
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

import pytest

from llem_dispatch.dispatch import registry
from llem_dispatch.errors import ConfigError
from llem_dispatch.study import load_study
from tests.plugin_site import install_plugin

REPO = Path(__file__).resolve().parents[3]
PLUGIN = REPO / "tests" / "plugins" / "llem_pool_placement"


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugin found through its entry point in this process; the registry restored."""
    site = install_plugin(PLUGIN, tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    known, classes = dict(registry._known), dict(registry._classes)
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    yield site
    registry._known.clear()
    registry._known.update(known)
    registry._classes.clear()
    registry._classes.update(classes)
    for name in [m for m in sys.modules if m.startswith("llem_pool_placement")]:
        del sys.modules[name]


def _study(tmp_path: Path, block: str = "procpool: {workers: 2}\n") -> Path:
    (tmp_path / "exp.py").write_text(
        "import os\n\ndef run(config):\n"
        "    return {'x': config['x'], 'gpus': os.environ['CUDA_VISIBLE_DEVICES']}\n"
    )
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: pooled\nrunner: local\nfunction: exp:run\nvirtual_gpus: 2\n"
        "gpus_per_experiment: 1\nplacement: procpool\n" + block + "grid: {x: [1, 2, 3, 4, 5]}\n"
    )
    return study


def _journal(out: Path) -> list[dict[str, Any]]:
    lines = (out / "journal.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.slow
def test_a_placement_from_another_distribution_runs_a_whole_study(tmp_path: Path) -> None:
    site = install_plugin(PLUGIN, tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if k != "LLEM_RUNNER"}
    env["DOCKER_HOST"] = f"unix://{tmp_path}/no-daemon.sock"  # no daemon is asked
    path = [str(site), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    out = tmp_path / "out"
    argv = ["run", str(_study(tmp_path)), "--results", str(out), "--plain"]
    proc = subprocess.run(
        [sys.executable, "-m", "llem_dispatch", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    facts = json.loads((out / "study.json").read_text())
    assert facts["placement"] == "procpool"
    assert facts["procpool"] == {"workers": 2, "gpus": ["0", "1"]}
    # The block as validated, under the placement's name: study.yaml loads again.
    assert facts["study"]["procpool"] == {"workers": 2, "start_method": "spawn"}
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert sorted(r["result"]["data"]["x"] for r in records) == [1, 2, 3, 4, 5]
    assert {r["status"] for r in records} == {"succeeded"}
    for record in records:
        assert record["gpu_ids"] in (["0"], ["1"])
        assert record["result"]["data"]["gpus"] == record["gpu_ids"][0]
    events = _journal(out)
    ran = Counter(e["key"] for e in events if e["event"] in {"started", "succeeded"})
    assert len(ran) == 5
    assert set(ran.values()) == {2}, "every experiment started and succeeded exactly once"


@pytest.mark.usefixtures("on_path")
def test_its_settings_are_its_own_model_validated_at_load(tmp_path: Path) -> None:
    study = load_study(_study(tmp_path, "procpool: {workers: 3}\n"))
    settings = study.placement_settings()
    assert type(settings).__name__ == "ProcessPoolSettings"
    assert settings is not None
    assert settings.model_dump() == {"workers": 3, "start_method": "spawn"}
    # No block: the model's defaults.
    default = load_study(_study(tmp_path, "")).placement_settings()
    assert default is not None
    assert default.model_dump() == {"workers": 2, "start_method": "spawn"}


@pytest.mark.usefixtures("on_path")
@pytest.mark.parametrize(
    ("block", "said"),
    [
        (
            "procpool: {wokers: 2}\n",
            "procpool.wokers: unknown field; did you mean 'workers'? "
            "(settings of placement 'procpool': start_method, workers)",
        ),
        ("procpool: {workers: many}\n", "procpool.workers: Input should be a valid integer"),
        ("procpool: {workers: 0}\n", "procpool.workers: Input should be greater than or equal"),
        ("procpool: 4\n", "procpool: Input should be a valid dictionary"),
        ("procpool:\n  start_method: fork\n", "procpool.start_method: Input should be 'spawn'"),
    ],
)
def test_a_bad_settings_block_is_refused_at_its_line(tmp_path: Path, block: str, said: str) -> None:
    path = _study(tmp_path, block)
    with pytest.raises(ConfigError) as info:
        load_study(path)
    message = info.value.message
    line = 8 if "start_method" in block else 7
    assert f"{path}:{line}: {said}" in message, message
    assert "1 problem(s)" in message


@pytest.mark.usefixtures("on_path")
def test_its_block_on_another_placement_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = _study(tmp_path)
    path.write_text(path.read_text().replace("placement: procpool", "placement: local"))
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert (
        f"{path}:7: procpool: a `procpool:` block, but the study runs on `placement: local`: "
        "add `placement: procpool`, or drop the block" in info.value.message
    )


@pytest.mark.usefixtures("on_path")
def test_a_misspelt_block_name_is_pointed_at_the_placement(tmp_path: Path) -> None:
    path = _study(tmp_path, "procpol: {workers: 2}\n")
    with pytest.raises(ConfigError, match=r"study.yaml:7: procpol: unknown field; did you mean "):
        load_study(path)
