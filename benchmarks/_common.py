"""Shared helpers for the benchmarks: docker CLI runs, statistics, tables, verdicts, cleanup."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

__all__ = [
    "IMAGE",
    "LABELS",
    "LABEL_FILTER",
    "NOOP_CMD",
    "NOOP_SCRIPT",
    "PYTHON_IMAGE",
    "REPO_ROOT",
    "BenchmarkError",
    "Context",
    "RssSampler",
    "Verdict",
    "busy_fraction",
    "cli_argv",
    "cli_run_once",
    "cpu_times",
    "docker_problem",
    "environment",
    "fmt_ms",
    "labelled_containers",
    "median",
    "percentile",
    "quiet_logs",
    "remove_labelled",
    "status_kb",
    "table",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("LLEM_BENCH_IMAGE", "llem-test/busybox:latest")
#: An image with python3, for `function:` runs (the helper, prestart's gate).
PYTHON_IMAGE = os.environ.get("LLEM_BENCH_PYTHON_IMAGE", "llem-test/python:bookworm")
LABEL_KEY = "llem.bench"
LABELS: dict[str, str] = {LABEL_KEY: "1"}
LABEL_FILTER = f"label={LABEL_KEY}=1"
#: The no-op experiment: write an empty JSON object as the result.
NOOP_SCRIPT = 'echo {} > "$LLEM_RESULT_PATH"'
NOOP_CMD = ["sh", "-c", NOOP_SCRIPT]


def quiet_logs() -> None:
    """Keep the library's structlog output to warnings (info lines would flood the tables)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


# -- statistics -------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def fmt_ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


# -- output -----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain-text table; the first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        return "  " + "  ".join(parts).rstrip()

    print(line(cells[0]))
    print("  " + "  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


class BenchmarkError(RuntimeError):
    """A benchmark could not measure what it set out to (a crash, not a missed target)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """One target of one benchmark: the measured value and whether it met the target."""

    bench: str
    metric: str
    value: str
    target: str
    passed: bool

    @property
    def word(self) -> str:
        return "PASS" if self.passed else "MISS"


@dataclass
class Context:
    """What a benchmark gets: the mode, a scratch dir (removed afterwards), its verdicts."""

    name: str
    smoke: bool
    workdir: Path
    verdicts: list[Verdict] = field(default_factory=list)

    def check(self, metric: str, value: str, target: str, passed: bool) -> Verdict:
        """Record and print one target's outcome; a MISS never fails the process."""
        verdict = Verdict(self.name, metric, value, target, passed)
        self.verdicts.append(verdict)
        print(f"  {verdict.word}  {metric} = {value}  (target {target})")
        return verdict

    def scratch(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.workdir))


# -- docker -----------------------------------------------------------------------------


def docker_problem() -> str | None:
    """None when the daemon answers and the benchmark image exists, else why not."""
    try:
        version = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        if version.returncode != 0:
            return f"Docker daemon not reachable: {version.stderr.strip()[:200]}"
        image = subprocess.run(
            ["docker", "image", "inspect", IMAGE], capture_output=True, timeout=15, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker CLI unusable: {exc}"
    if image.returncode != 0:
        return f"image {IMAGE} missing (build it with `bash .ci/setup-docker.sh`)"
    return None


def _output(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=15, check=False, cwd=REPO_ROOT
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def environment() -> str:
    """One line on where the figures come from: time, machine, daemon, code revision."""
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
    revision = _output(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if _output(["git", "status", "--porcelain", "--", "src"]):
        revision += " + uncommitted changes in src/"
    docker = _output(["docker", "version", "--format", "{{.Server.Version}}"]) or "unavailable"
    return (
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} cores, "
        f"{mem_kb / 2**20:.1f} GiB; Docker {docker}; llem-dispatch {revision}"
    )


def labelled_containers() -> list[str]:
    """Ids of every container (running or not) carrying the benchmark label."""
    proc = subprocess.run(
        ["docker", "ps", "-aq", "--filter", LABEL_FILTER],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.stdout.split()


def remove_labelled() -> list[str]:
    """Force-remove every benchmark-labelled container; returns the ids it found."""
    ids = labelled_containers()
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=120, check=False)
    return ids


def cli_argv(
    command: Sequence[str],
    *,
    network: str | None,
    env: Mapping[str, str] | None = None,
    mounts: Mapping[str, str] | None = None,
) -> list[str]:
    """`docker run --rm` of IMAGE, labelled for cleanup."""
    argv = ["docker", "run", "--rm", "--label", f"{LABEL_KEY}=1"]
    if network is not None:
        argv += ["--network", network]
    for key, value in (env or {}).items():
        argv += ["-e", f"{key}={value}"]
    for source, target in (mounts or {}).items():
        argv += ["-v", f"{source}:{target}"]
    return [*argv, IMAGE, *command]


async def cli_run_once(workdir: Path, *, network: str | None, index: int) -> float:
    """One experiment the way the predecessor tool ran it: one blocking `docker run --rm`.

    Exchange dir with the config, bind-mounted; result read back; dir removed.
    Returns the wall time in seconds.
    """
    start = time.perf_counter()
    exchange = Path(tempfile.mkdtemp(prefix="llem-cli-", dir=workdir))
    (exchange / "config.json").write_text(json.dumps({"bench": "cli", "i": index}))
    argv = cli_argv(
        NOOP_CMD,
        network=network,
        env={
            "LLEM_CONFIG_PATH": "/run/llem/config.json",
            "LLEM_RESULT_PATH": "/run/llem/result.json",
        },
        mounts={str(exchange): "/run/llem"},
    )
    proc = await anyio.run_process(argv, check=False)
    if proc.returncode != 0:
        raise BenchmarkError(
            f"docker run failed ({proc.returncode}): {proc.stderr.decode()[-500:]}"
        )
    json.loads((exchange / "result.json").read_text())
    shutil.rmtree(exchange)
    return time.perf_counter() - start


# -- host CPU ---------------------------------------------------------------------------


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs together, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of all CPUs' time spent busy between two `cpu_times()` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else math.nan


# -- memory -----------------------------------------------------------------------------


def status_kb(key: str, pid: int | str = "self") -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM); -1 where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


class RssSampler:
    """Samples VmRSS every `interval_s` in a thread (independent of a busy event loop)."""

    def __init__(self, interval_s: float = 0.05, extra: Callable[[], Any] | None = None) -> None:
        self.interval_s = interval_s
        self.samples: list[int] = []
        self.extra = extra
        self.extra_samples: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(status_kb("VmRSS"))
            if self.extra is not None:
                self.extra_samples.append(self.extra())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_kb(self) -> int:
        return max(self.samples, default=-1)
