"""9. Slurm overhead: a study through `placement: slurm` vs a bare `sbatch --wait` loop.

The same tiny experiment (a Python process that writes its result JSON) runs
one at a time as Slurm jobs asking for 1 GPU, on the Slurm that
`.ci/setup-slurm.sh` starts (one node, 4 fake GPUs). Baseline: a shell-style
loop of `sbatch --wait --gpus=1 --wrap "python3 -c ..."`, each job running the
experiment directly and the loop reading its result file back. Ours:
`run_study` with `placement: slurm`, `runner: local`, `max_concurrency: 1`
(each job starts our job entry, which builds the local runner and runs the
same command; the driver takes the job's outcome file as soon as a `stat` finds it,
and keeps `squeue` polls for jobs that end without one), at the default poll
interval (1 s) and at 0.25 s. Rounds are ABBA-ordered. The ratio is ours over the
baseline per experiment; the one-off shared-filesystem check job each study starts
with is timed separately.

Where the time goes (the parts table), per experiment, medians: for the baseline,
submit -> result file written (Slurm's start, Python, the experiment) and written ->
`sbatch --wait` returned (its own polling: it sleeps 2 s before its first look);
for ours, the `sbatch` call, its return -> started.json's time (Slurm's start, the
job's Python and imports), -> the experiment's exit (the pickled runner factory, the
runner, the experiment), -> outcome.json written, -> the driver noticed it, and ->
the next `sbatch` (the record, the dispatcher). Run it beside `stress-ng --cpu N`
to see which part a busy host stretches.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from benchmarks._common import BenchmarkError, Context, median, table
from llem_dispatch import Study, run_study
from llem_dispatch.slurm import commands, placement

NAME = "slurm_overhead"
TITLE = "per-experiment time: placement slurm vs a bare `sbatch --wait` loop"
NEEDS_DOCKER = False

#: At the default settings, on an idle host (a busy one is reported beside it).
TARGET = 1.05
EXPERIMENT = (
    "import json, os; path = os.environ.get('LLEM_RESULT_PATH') or 'result.json'; "
    "json.dump({'ok': 1}, open(path + '.tmp', 'w')); os.replace(path + '.tmp', path)"
)


@dataclass
class Parts:
    """Epoch times of each job's steps, by attempt dir (ours) or job folder (bare)."""

    jobs: dict[str, dict[str, float]] = field(default_factory=dict)

    def at(self, folder: str, **marks: float) -> None:
        self.jobs.setdefault(folder, {}).update(marks)

    def span(self, start: str, end: str, variant: str) -> str:
        """The median seconds from mark `start` to `end` over the variant's jobs."""
        values = [
            j[end] - j[start]
            for folder, j in self.jobs.items()
            if _variant(folder) == variant and start in j and end in j
        ]
        return f"{median(values):.3f}" if values else ""


def _variant(folder: str) -> str:
    """`ours` from `.../ours0/ours0/slurm/<attempt>`, `bare` from `.../bare1/bare-3`."""
    path = Path(folder)
    return (path.parent.name if path.name.startswith("bare-") else path.parents[1].name).rstrip(
        "0123456789"
    )


def _epoch(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


@contextmanager
def _timed(parts: Parts) -> Iterator[None]:
    """Time our jobs' steps: each `sbatch` call, and each outcome as the driver takes it."""
    real_sbatch, real_outcome_of = commands.sbatch, placement.outcome_of

    async def sbatch(argv: Sequence[str], **kw: Any) -> str:
        folder = next(a.split("=", 1)[1] for a in argv if a.startswith("--chdir="))
        begun = time.time()
        job_id: str = await real_sbatch(argv, **kw)
        parts.at(folder, submit=begun, submitted=time.time())
        return job_id

    def outcome_of(attempt: Any, state: str, *args: Any) -> Any:
        noticed = time.time()
        folder = attempt.folder
        started = (attempt.started or {}).get("started_at")
        outcome = folder / "outcome.json"
        marks = {"noticed": noticed}
        if outcome.exists():
            marks["written"] = outcome.stat().st_mtime
            report = ((attempt.outcome or {}).get("info") or {}).get("report") or {}
            exited = _epoch(report.get("exited_at"))
            if exited is not None:
                marks["exited"] = exited
        if isinstance(started, int | float):
            marks["started"] = float(started)
        parts.at(str(folder), **marks)
        return real_outcome_of(attempt, state, *args)

    commands.sbatch = sbatch
    placement.outcome_of = outcome_of
    try:
        yield
    finally:
        commands.sbatch, placement.outcome_of = real_sbatch, real_outcome_of


def _next_submits(parts: Parts) -> None:
    """Each job's `next` mark: the next `sbatch` of the same study (sequential jobs)."""
    by_study: dict[str, list[dict[str, float]]] = {}
    for folder, marks in parts.jobs.items():
        by_study.setdefault(str(Path(folder).parent), []).append(marks)
    for jobs in by_study.values():
        jobs.sort(key=lambda m: m.get("submit", 0.0))
        for one, after in itertools.pairwise(jobs):
            if "submit" in after:
                one["next"] = after["submit"]


async def _bare(workdir: Path, count: int, parts: Parts | None = None) -> float:
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
        begun = time.time()
        with anyio.fail_after(120):
            await anyio.run_process(argv)
        returned = time.time()
        result = folder / "result.json"
        if not result.exists():
            raise BenchmarkError(f"the bare job wrote no result in {folder}")
        if parts is not None:
            parts.at(str(folder), submit=begun, written=result.stat().st_mtime, returned=returned)
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
    study = _study(tag, count, poll_s)
    start = time.perf_counter()
    with anyio.fail_after(60 + 30 * count):
        summary = await run_study(study, workdir / tag, study_dir=workdir)
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


def _python_start_s(count: int = 5) -> float:
    """A job's own start on this host: Python and the job entry's imports (median)."""
    times = []
    for _ in range(count):
        begun = time.perf_counter()
        os.system(f"{sys.executable} -c 'import llem_dispatch.slurm.job'")  # noqa: S605
        times.append(time.perf_counter() - begun)
    return median(times)


async def run(ctx: Context) -> None:
    if shutil.which("sbatch") is None:
        raise BenchmarkError("needs Slurm: run `bash .ci/setup-slurm.sh` (Debian, root)")
    count = 2 if ctx.smoke else 8
    rounds = 1 if ctx.smoke else 2
    per: dict[str, list[float]] = {"bare": [], "ours": [], "ours_fast": []}
    parts = Parts()
    await _bare(ctx.workdir / "warm", 1)  # Slurm's first job of a while is slower
    with _timed(parts):
        for r in range(rounds):
            order = ["bare", "ours", "ours_fast"]
            for variant in order if r % 2 == 0 else order[::-1]:
                folder = ctx.workdir / f"{variant}{r}"
                if variant == "bare":
                    per[variant].append(await _bare(folder, count, parts))
                else:
                    poll = 1.0 if variant == "ours" else 0.25
                    per[variant].append(await _ours(folder, f"{variant}{r}", count, poll))
    check_s = await _check_job(ctx.workdir / "check")
    start_s = await anyio.to_thread.run_sync(_python_start_s)
    load = os.getloadavg()[0]
    print(
        f"  {count} sequential 1-GPU experiments per variant and round, {rounds} ABBA "
        f"round(s); shared-filesystem check job: +{check_s:.2f}s once per study; "
        f"load average {load:.1f} on {os.cpu_count()} cores"
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
    _next_submits(parts)
    steps = [
        ("submit -> result (bare) or outcome written", "submit", "written"),
        ("bare: written -> sbatch --wait returned", "written", "returned"),
        ("ours: sbatch call", "submit", "submitted"),
        ("ours: -> started.json (Slurm start, Python)", "submitted", "started"),
        ("ours: -> experiment exited", "started", "exited"),
        ("ours: -> outcome.json written", "exited", "written"),
        ("ours: -> driver noticed it", "written", "noticed"),
        ("ours: -> next sbatch (record)", "noticed", "next"),
    ]
    print(
        "  where the time goes, per experiment (medians, s); a job's Python and "
        f"job-entry imports alone: {start_s:.3f}s"
    )
    table(
        ["part", "bare", "poll 1 s", "poll 0.25 s"],
        [
            [name, *(parts.span(a, b, v) for v in ("bare", "ours", "ours_fast"))]
            for name, a, b in steps
        ],
    )
    ratio = median(per["ours"]) / bare
    ctx.check(
        "ours/bare per experiment [default settings]",
        f"{ratio:.3f}",
        f"<= {TARGET}",
        ratio <= TARGET,
    )
    fast = median(per["ours_fast"]) / bare
    ctx.check(
        "ours/bare per experiment [poll 0.25 s]", f"{fast:.3f}", f"<= {TARGET}", fast <= TARGET
    )
