"""examples/slurm/run.sbatch: a study inside one allocation, its experiments as job steps."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import anyio
import pytest

import llem_dispatch
from tests.slurm.conftest import records, squeue_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "slurm"


@pytest.mark.timeout(300)
async def test_the_sbatch_example_runs_each_experiment_as_a_step(
    tmp_path: Path, study_name: str
) -> None:
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder)
    env = {
        **os.environ,
        # The job runs this checkout's package with this interpreter, as a venv would.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(Path(llem_dispatch.__file__).resolve().parents[1]),
        "LLEM_RESULTS": str(folder / "out"),
    }
    argv = ["sbatch", "--wait", f"--job-name=llem-{study_name}", "run.sbatch"]
    with anyio.fail_after(240):
        done = await anyio.run_process(argv, cwd=folder, env=env, check=False)
    (log,) = folder.glob("llem-*.out")
    text = log.read_text()
    assert done.returncode == 0, text
    assert "6 succeeded" in " ".join(text.split()), text
    found = records(folder / "out")
    assert len(found) == 6
    allocations = set()
    for record in found.values():
        assert record["status"] == "succeeded", record
        job, _, step = record["job_id"].partition(".")
        allocations.add(job)
        assert step.isdigit(), "each experiment is a step of the allocation"
        seen = record["result"]["data"]["cuda_visible_devices"].split(",")
        assert len(seen) == record["config"]["n_gpus"]
        assert record["gpu_ids"] == seen
    assert len(allocations) == 1
    assert squeue_jobs(f"llem-{study_name}") == {}
