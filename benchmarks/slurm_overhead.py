"""9. Slurm overhead: a study through `placement: slurm` vs a bare `sbatch --wait` loop.

The same tiny experiment (a Python process that writes its result JSON) runs
one at a time as Slurm jobs asking for 1 GPU, on the Slurm that
`.ci/setup-slurm.sh` starts (one node, 4 fake GPUs). Baseline: a shell-style
loop of `sbatch --wait --gpus=1 --wrap "python3 -c ..."`, each job running the
experiment directly and the loop reading its result file back. Ours:
`run_study` with `placement: slurm`, `runner: local`, `max_concurrency: 1`
(each job starts our job entry, which builds the local runner and runs the
same command; the driver follows it by `squeue` polls and writes the record),
at the default poll interval (1 s) and at 0.25 s. Rounds are ABBA-ordered. The
ratio is ours over the baseline per experiment; the one-off shared-filesystem
check job each study starts with is timed separately.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from benchmarks._common import BenchmarkError, Context, median, table
from llem_dispatch import Study, run_study

NAME = "slurm_overhead"
TITLE = "per-experiment time: placement slurm vs a bare `sbatch --wait` loop"
NEEDS_DOCKER = False

TARGET = 1.5
EXPERIMENT = (
    "import json, os; path = os.environ.get('LLEM_RESULT_PATH') or 'result.json'; "
    "json.dump({'ok': 1}, open(path + '.tmp', 'w')); os.replace(path + '.tmp', path)"
)


async def _bare(workdir: Path, count: int) -> float:
    """`sbatch --wait` per experiment, one after the other; seconds per experiment."""
    start = time.perf_counter()
    for i in range(count):
        folder = workdir / f"bare-{i}"
        folder.mkdir(parents=True)
        argv = [
            "sbatch", "--wait", "--parsable", "--gpus=1", "--job-name=llem-bench-bare",
            f"--chdir={folder}", f"--output={folder}/slurm-%j.out",
            "--wrap", f"exec {sys.executable} -c \"{EXPERIMENT}\"",
        ]  # fmt: skip
        with anyio.fail_after(120):
            await anyio.run_process(argv)
        if not (folder / "result.json").exists():
            raise BenchmarkError(f"the bare job wrote no result in {folder}")
    return (time.perf_counter() - start) / count


def _study(tag: str, count: int, poll_s: float) -> Study:
    data: dict[str, Any] = {
        "name": f"bench-{tag}",
        "placement": "slurm",
        "runner": "local",
        "command": [sys.executable, "-c", EXPERIMENT],
        "max_concurrency": 1,
        "grid": {"i": list(range(count)), "tag": [tag]},
        "slurm": {
            "poll_interval_s": poll_s,
            "max_poll_interval_s": max(poll_s, 2.0),
            "check_shared_fs": False,
        },
    }
    return Study.model_validate(data)


async def _ours(workdir: Path, tag: str, count: int, poll_s: float) -> float:
    """The study's seconds per experiment (its set-up included, no check job)."""
    start = time.perf_counter()
    with anyio.fail_after(60 + 30 * count):
        summary = await run_study(_study(tag, count, poll_s), workdir / tag, study_dir=workdir)
    if summary.succeeded != count:
        raise BenchmarkError(f"{tag}: {summary.succeeded}/{count} succeeded")
    return (time.perf_counter() - start) / count


async def _check_job(workdir: Path) -> float:
    """Seconds the shared-filesystem check adds once per study (a study of 1 with it)."""
    data = _study("check", 1, 0.25).model_dump(by_alias=True)
    data["slurm"]["check_shared_fs"] = True
    study = Study.model_validate(data)
    plain = await _ours(workdir, "nocheck", 1, 0.25)
    start = time.perf_counter()
    await run_study(study, workdir / "check", study_dir=workdir)
    return time.perf_counter() - start - plain


async def run(ctx: Context) -> None:
    if shutil.which("sbatch") is None:
        raise BenchmarkError("needs Slurm: run `bash .ci/setup-slurm.sh` (Debian, root)")
    count = 2 if ctx.smoke else 8
    rounds = 1 if ctx.smoke else 2
    per: dict[str, list[float]] = {"bare": [], "ours": [], "ours_fast": []}
    await _bare(ctx.workdir / "warm", 1)  # Slurm's first job of a while is slower
    for r in range(rounds):
        order = ["bare", "ours", "ours_fast"]
        for variant in order if r % 2 == 0 else order[::-1]:
            folder = ctx.workdir / f"{variant}{r}"
            if variant == "bare":
                per[variant].append(await _bare(folder, count))
            else:
                poll = 1.0 if variant == "ours" else 0.25
                per[variant].append(await _ours(folder, f"{variant}{r}", count, poll))
    check_s = await _check_job(ctx.workdir / "check")
    print(
        f"  {count} sequential 1-GPU experiments per variant and round, {rounds} ABBA "
        f"round(s); shared-filesystem check job: +{check_s:.2f}s once per study"
    )
    bare = median(per["bare"])
    table(
        ["variant", "s/experiment", "- bare s", "/ bare"],
        [
            [name, f"{median(v):.2f}", f"{median(v) - bare:+.2f}", f"{median(v) / bare:.2f}"]
            for name, v in (
                ("bare sbatch --wait", per["bare"]),
                ("ours, poll 1 s", per["ours"]),
                ("ours, poll 0.25 s", per["ours_fast"]),
            )
        ],
    )
    for name, label in (("ours", "poll 1 s"), ("ours_fast", "poll 0.25 s")):
        ratio = median(per[name]) / bare
        ctx.check(
            f"ours/bare per experiment [{label}]", f"{ratio:.3f}", f"<= {TARGET}", ratio <= TARGET
        )
