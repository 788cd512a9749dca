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


@pytest.mark.timeout(200)
async def test_ctrl_c_on_a_driver_in_an_allocation_stops_its_steps(
    tmp_path: Path, study_name: str
) -> None:
    folder = tmp_path / "example"
    shutil.copytree(EXAMPLE, folder)
    study = (folder / "study.yaml").read_text()
    marker = folder / "experiments.log"
    # Each experiment notes its start, then sleeps far longer than the test.
    sleeper = (
        f"import os, time; open({str(marker)!r}, 'a').write(os.environ['LLEM_CONFIG_PATH'] "
        "+ chr(10)); time.sleep(300)"
    )
    study = study.replace("function: experiment:run", f"command: [python3, -c, {sleeper!r}]")
    (folder / "study.yaml").write_text(study)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(Path(llem_dispatch.__file__).resolve().parents[1]),
        "LLEM_RESULTS": str(folder / "out"),
    }
    argv = ["sbatch", "--parsable", f"--job-name=llem-{study_name}", "run.sbatch"]
    done = await anyio.run_process(argv, cwd=folder, env=env)
    job = done.stdout.decode().strip()
    with anyio.fail_after(120):
        while not marker.exists() or len(marker.read_text().splitlines()) < 3:
            await anyio.sleep(0.3)
    await anyio.run_process(["scancel", "--signal=INT", "--batch", job])
    with anyio.fail_after(90):
        while squeue_jobs(f"llem-{study_name}"):
            await anyio.sleep(0.3)
    text = next(folder.glob("llem-*.out")).read_text()
    assert "interrupted" in text, text
    shown = await anyio.run_process(["scontrol", "-o", "show", "job", job])
    assert "ExitCode=130:0" in shown.stdout.decode()
    assert records(folder / "out") == {}
    left = await anyio.run_process(["pgrep", "-f", str(marker)], check=False)
    assert left.stdout.decode().split() == [], "an experiment process outlived its step"
