"""10. Interference: a preparing neighbour beside a measured window, and what keeps it out.

A measured workload runs in alternating windows, ALONE and WITH A NEIGHBOUR that does
what a prepare phase does: a separate process, in its own process group, loading a
model's weights from local disk into host memory in a loop. Each isolation mechanism
is a condition of its own, paired with an alone window back to back:

- none: the neighbour just runs;
- pause: the neighbour's process group is SIGSTOPped, and seen stopped (every thread
  in state T), for the whole measured window, and SIGCONTed after it: the quiet
  windows the dispatcher will use;
- cpu: the measurer pinned to half the cores, the neighbour to the other half at
  nice 19 and the idle I/O class, its thread pools (OMP_NUM_THREADS, ...) sized to
  its cores;
- pause+cpu: both.

GPU variant (torch with CUDA, transformers and nvidia-ml-py present): HF greedy
generation with a random-weight Llama (hidden 1024, 16 layers, bf16) at batch 1 and
16, each window one `generate` of a fixed length sized to the window (warmed up at
that very length first), and a GPU-bound control (8192x8192 bf16 matmuls, a fixed
count per window). The neighbour runs transformers' `from_pretrained` (no
`device_map`: host memory only) of a 1.9 GB random-weight safetensors Llama. Per
window: throughput, and energy per unit of work from NVML's total-energy counter.

Schedule: per round, the four conditions in an order rotated by one each round, laid
out `c0 A c1 c2 A c3`. Each condition window is paired with the alone window beside
it, after it in one round and before it in the next; an alone window serves two
pairs. Before every window a lead-in of `gap_s` runs: the measurer works on,
unmeasured (no idle GPU or CPU before a window), while the neighbour of a non-alone
condition runs, so a paused window starts right after the neighbour was busy. All
four conditions interleave, so drift moves every ratio alike.

Reported per condition: the mean over pairs of condition/alone for throughput and
for J/unit, the pair ratios' min and max, each side's window cv, and the neighbour's
own CPU time and progress during the windows (what it actually did).

Target (pause, the dispatcher's default): throughput and J/unit within 2% of alone,
and the window cv no wider than alone's, up to sampling noise: <= 1.5x alone's
+ 0.005 (the cv of six windows itself varies by about a third).

CPU variant (no torch or GPU; what CI runs): the measured workload is a pure-Python
loop, the neighbour a file read + copy loop. It checks the mechanisms, not timing:
in every paused (and alone) window the neighbour's progress counter, which it writes
to a file, and its CPU time stay put; after each pause the counter moves again; the
confinement is read back from /proc and ioprio_get.

Standalone (sizes of one's own, raw windows as JSON; the GPU machine's script
benchmarks/gpu/interference.sh uses this):
`python -m benchmarks.interference [--smoke] [--rounds 6] [--window-s 2.5] [--json F]`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import anyio
import anyio.to_thread

from benchmarks._common import REPO_ROOT, BenchmarkError, Context, environment, table

NAME = "interference"
TITLE = (
    "a neighbour loading weights into host memory beside a measured window: "
    "none / pause / cpu / pause+cpu vs alone"
)
NEEDS_DOCKER = False

ALONE = "alone"
CONDITIONS = ("none", "pause", "cpu", "pause+cpu")
#: In the order they run: the short, steady control first, so a run cut short keeps it.
GPU_WORKLOADS = ("matmul", "gen-b1", "gen-b16")
CPU_WORKLOADS = ("pyloop",)
#: Pause's throughput and J/unit must stay this close to alone's.
RATIO_TOLERANCE = 0.02
#: Pause's window cv may be this much wider than alone's before it counts (sampling noise).
CV_FACTOR = 1.5
CV_SLACK = 0.005
#: How long a neighbour may take to stop (every thread in state T), or to move again.
STOP_BOUND_S = 5.0
RESUME_BOUND_S = 10.0
#: The read loader's chunk: one progress tick per chunk read and copied.
CHUNK = 8 << 20
#: Thread-pool sizes a confined neighbour gets, set to its core count.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "RAYON_NUM_THREADS",
)
#: The measured model (the sizes of DESIGN.md's observation) and the neighbour's.
MEASURED_LLAMA: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
#: 16 layers of this make 954M parameters, 1.9 GB in bf16.
NEIGHBOUR_LLAMA: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
PROMPT_TOKENS = 32
MATMUL_N = 8192


@dataclass(frozen=True, slots=True)
class Settings:
    """What one run measures, and how long its windows are."""

    mode: str  # "gpu" or "cpu"
    rounds: int
    window_s: float
    gap_s: float
    workloads: tuple[str, ...]
    loader: str  # from_pretrained | safetensors | read
    neighbour_layers: int  # Llama weights (from_pretrained, safetensors)
    neighbour_mb: int  # a plain file (read)
    check_resume: bool  # wait, after each pause, for the neighbour's counter to move


def default_settings(mode: str, smoke: bool) -> Settings:
    if mode == "gpu":
        return Settings(
            mode="gpu",
            rounds=1 if smoke else 6,
            window_s=1.0 if smoke else 2.5,
            gap_s=0.3 if smoke else 0.4,
            workloads=GPU_WORKLOADS,
            loader="from_pretrained",
            neighbour_layers=4 if smoke else 16,
            neighbour_mb=0,
            check_resume=False,
        )
    return Settings(
        mode="cpu",
        rounds=2 if smoke else 6,
        window_s=0.25 if smoke else 1.0,
        gap_s=0.05 if smoke else 0.1,
        workloads=CPU_WORKLOADS,
        loader="read",
        neighbour_layers=0,
        neighbour_mb=32 if smoke else 256,
        check_resume=True,
    )


def gpu_problem() -> str | None:
    """None when the GPU variant can run here (torch with CUDA, transformers, pynvml)."""
    try:
        import pynvml  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def detect_mode() -> str:
    """`LLEM_BENCH_INTERFERENCE_MODE` (gpu/cpu) if set, else gpu where it can run."""
    forced = os.environ.get("LLEM_BENCH_INTERFERENCE_MODE", "")
    if forced in ("gpu", "cpu"):
        return forced
    return "gpu" if gpu_problem() is None else "cpu"


# -- the schedule (pure) ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slot:
    """One window of the schedule; a condition window names its alone partner."""

    round: int
    condition: str
    partner: int | None = None
    first: bool = False  # the condition window comes before its alone partner


def schedule(rounds: int, conditions: Sequence[str] = CONDITIONS) -> list[Slot]:
    """Rounds of `c0 A c1 c2 A c3 ...`, the conditions rotated by one each round.

    Condition i sits at position (i - round) mod n, so it alternates between coming
    before its alone partner (even positions) and after it (odd positions).
    """
    if len(conditions) % 2:
        raise ValueError("schedule needs an even number of conditions")
    slots: list[Slot] = []
    for r in range(rounds):
        k = r % len(conditions)
        order = [*conditions[k:], *conditions[:k]]
        for j in range(0, len(order), 2):
            alone = len(slots) + 1
            slots += [
                Slot(r, order[j], alone, first=True),
                Slot(r, ALONE),
                Slot(r, order[j + 1], alone, first=False),
            ]
    return slots


# -- processes: stat, affinity, I/O priority --------------------------------------------


def _stat_fields(path: str) -> list[str]:
    """/proc/.../stat from field 3 (state) on; comm may hold spaces and parentheses."""
    text = Path(path).read_text()
    return text[text.rfind(")") + 2 :].split()


def process_cpu_ticks(pid: int) -> int:
    """utime + stime of a whole process (every thread), in clock ticks."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    return int(fields[11]) + int(fields[12])


def process_nice(pid: int) -> int:
    return int(_stat_fields(f"/proc/{pid}/stat")[16])


def steal_ticks() -> int:
    """Steal time of all CPUs together (/proc/stat), in clock ticks: on a virtual
    machine, time its CPUs were ready to run but the host ran something else."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) if len(fields) > 8 else 0


def all_threads_stopped(pid: int) -> bool:
    """Every thread of `pid` in state T (stopped) or already gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for tid in tids:
        try:
            state = _stat_fields(f"/proc/{pid}/task/{tid}/stat")[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def pin_process(cpus: Sequence[int]) -> None:
    """Set the affinity of every thread of this process (sched_setaffinity is per thread)."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            os.sched_setaffinity(int(tid), cpus)


def split_cpus(cpus: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(measurer's half, neighbour's half): hyperthread siblings kept on one side where the
    kernel says which they are; a single CPU can't be split and is shared."""
    ordered = sorted(cpus)
    if len(ordered) < 2:
        return tuple(ordered), tuple(ordered)
    groups: dict[str, list[int]] = {}
    for cpu in ordered:
        try:
            topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
            key = Path(topology).read_text().strip()
        except OSError:
            key = str(cpu)
        groups.setdefault(key, []).append(cpu)
    units = list(groups.values()) if len(groups) >= 2 else [[c] for c in ordered]
    half = len(units) // 2
    return (
        tuple(c for unit in units[:half] for c in unit),
        tuple(c for unit in units[half:] for c in unit),
    )


IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_SHIFT = 13
IOPRIO_CLASS_IDLE = 3
IO_CLASSES = {0: "none", 1: "realtime", 2: "best-effort", 3: "idle"}
#: (ioprio_set, ioprio_get) system call numbers; glibc wraps neither.
_IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}


def _ioprio_syscall(index: int, *args: int) -> int:
    numbers = _IOPRIO_SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(f"ioprio system calls unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.syscall(numbers[index], *(ctypes.c_long(a) for a in args)))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


def set_idle_io(pid: int = 0) -> None:
    """The idle I/O class (as `ionice -c3`) for `pid` (0: the calling thread)."""
    _ioprio_syscall(0, IOPRIO_WHO_PROCESS, pid, IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT)


def io_class(pid: int) -> str:
    return IO_CLASSES.get(_ioprio_syscall(1, IOPRIO_WHO_PROCESS, pid) >> IOPRIO_CLASS_SHIFT, "?")


@dataclass(frozen=True, slots=True)
class Confinement:
    """Where a confined neighbour runs: its cores, its nice, the idle I/O class."""

    cpus: tuple[int, ...]
    nice: int = 19
    idle_io: bool = True

    def argv(self) -> list[str]:
        flags = ["--cpus", ",".join(map(str, self.cpus)), "--nice", str(self.nice)]
        return [*flags, "--idle-io"] if self.idle_io else flags

    def env(self) -> dict[str, str]:
        return dict.fromkeys(THREAD_VARS, str(len(self.cpus)))

    def apply(self) -> None:
        """In the neighbour, before it starts any thread (threads inherit all three)."""
        os.sched_setaffinity(0, self.cpus)
        os.nice(self.nice - os.nice(0))
        if self.idle_io:
            set_idle_io(0)

    def read_back(self, pid: int) -> str | None:
        """None when `pid` runs as confined, else what differs."""
        seen = (tuple(sorted(os.sched_getaffinity(pid))), process_nice(pid), io_class(pid))
        wanted = (tuple(sorted(self.cpus)), self.nice, "idle" if self.idle_io else seen[2])
        return None if seen == wanted else f"asked {wanted}, read back {seen}"


def cpu_list(cpus: Sequence[int]) -> str:
    """0-7,9 style."""
    ordered = sorted(cpus)
    runs: list[str] = []
    start = prev = ordered[0]
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(runs)


# -- the neighbour ----------------------------------------------------------------------


Loader = Callable[[Callable[[], None]], None]


def read_loader(path: Path) -> Loader:
    """Read the file in chunks and copy each into memory held until the pass ends (a
    loader's tensors); a tick per chunk."""

    def load(tick: Callable[[], None]) -> None:
        held: list[bytearray] = []
        with path.open("rb", buffering=0) as file:
            while chunk := file.read(CHUNK):
                held.append(bytearray(chunk))
                tick()
        held.clear()

    return load


def _materialise(tensors: Any) -> None:
    """Copy every tensor into memory of its own. safetensors and transformers map the
    file and hand out tensors backed by the page cache (a load of 1.9 GB then takes
    milliseconds and reads nothing); a prepare phase wants the weights in host memory."""
    copies = [t.detach().clone() for t in tensors]
    copies.clear()


def safetensors_loader(path: Path) -> Loader:
    from safetensors.torch import load_file

    file = path / "model.safetensors" if path.is_dir() else path

    def load(tick: Callable[[], None]) -> None:
        tensors = load_file(str(file))
        _materialise(tensors.values())
        del tensors
        tick()

    return load


def from_pretrained_loader(path: Path) -> Loader:
    import torch
    from transformers import AutoModelForCausalLM

    def load(tick: Callable[[], None]) -> None:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16)
        _materialise(model.state_dict().values())
        del model
        gc.collect()
        tick()

    return load


LOADERS: dict[str, Callable[[Path], Loader]] = {
    "read": read_loader,
    "safetensors": safetensors_loader,
    "from_pretrained": from_pretrained_loader,
}


def neighbour_main(weights: Path, progress: Path, loader: str, confine: Confinement | None) -> None:
    """The neighbour process: confine itself (first), then load forever, counting loads
    (or chunks) in `progress` (fixed-width, rewritten in place)."""
    if confine is not None:
        confine.apply()
    fd = os.open(progress, os.O_RDWR | os.O_CREAT, 0o644)
    count = 0

    def tick() -> None:
        nonlocal count
        count += 1
        os.pwrite(fd, f"{count:>20}\n".encode(), 0)

    load = LOADERS[loader](weights)
    while True:
        load(tick)


class Neighbour:
    """A neighbour process in its own process group; pause and resume that are seen to take."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        weights: Path,
        loader: str,
        confine: Confinement | None = None,
    ) -> None:
        self.name = name
        self.confine = confine
        self.progress_path = workdir / f"neighbour-{name}.progress"
        self.log_path = workdir / f"neighbour-{name}.log"
        argv = [
            sys.executable,
            "-m",
            "benchmarks.interference",
            "--neighbour",
            str(weights),
            "--progress",
            str(self.progress_path),
            "--loader",
            loader,
            *(confine.argv() if confine else []),
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **(confine.env() if confine else {}),
        }
        self._log: IO[bytes] = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGSTOP reaches every process
        )
        self.paused = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchmarkError(f"neighbour {self.name} exited ({self.proc.returncode}):\n{tail}")

    def progress(self) -> int:
        try:
            text = self.progress_path.read_bytes().strip()
        except FileNotFoundError:
            return 0
        return int(text) if text else 0

    def cpu_ticks(self) -> int:
        return process_cpu_ticks(self.pid)

    def pause(self) -> float:
        """SIGSTOP the group; return once every thread is seen stopped (seconds it took)."""
        self._check_alive()
        start = time.monotonic()
        os.killpg(self.pid, signal.SIGSTOP)
        while not all_threads_stopped(self.pid):
            if time.monotonic() - start > STOP_BOUND_S:
                raise BenchmarkError(f"neighbour {self.name} not stopped after {STOP_BOUND_S} s")
            time.sleep(0.0005)
        self.paused = True
        return time.monotonic() - start

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)
        self.paused = False

    def wait_progress(self, beyond: int, bound_s: float) -> bool:
        """Wait (at most `bound_s`) until the counter passes `beyond`; False if it did not."""
        deadline = time.monotonic() + bound_s
        while self.progress() <= beyond:
            self._check_alive()
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()


# -- measured workloads -----------------------------------------------------------------


class Workload(Protocol):
    """Runs one window of fixed work (calibrated by `prepare`) and returns its units."""

    name: str
    unit: str
    description: str

    def prepare(self, window_s: float, lead_in_s: float) -> None:
        """Size (and warm up at) the window's work and the lead-in's."""

    def lead_in(self) -> None:
        """About `lead_in_s` of the same work, unmeasured, just before a window."""

    def window(self) -> float:
        """One window of the fixed work; returns its units."""


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class PythonLoop:
    """The CPU variant's measurer: a pure-Python loop, a fixed number of chunks a window."""

    name = "pyloop"
    unit = "Mstep"
    STEPS = 20_000

    def __init__(self) -> None:
        self.chunks = 1
        self.lead_chunks = 1
        self.description = "pure-Python loop"

    def _run(self, chunks: int) -> None:
        total = 0
        for _ in range(chunks):
            for i in range(self.STEPS):
                total += i ^ (i >> 3)

    def prepare(self, window_s: float, lead_in_s: float) -> None:
        per_chunk = _timed(lambda: self._run(20)) / 20
        self.chunks = max(1, round(window_s / per_chunk))
        self.lead_chunks = max(1, round(lead_in_s / per_chunk))
        self.description = f"pure-Python loop, {self.chunks * self.STEPS / 1e6:.1f} M steps"

    def lead_in(self) -> None:
        self._run(self.lead_chunks)

    def window(self) -> float:
        self._run(self.chunks)
        return self.chunks * self.STEPS / 1e6


class Generate:
    """HF greedy generation of exactly `tokens` new tokens for a batch of random prompts."""

    unit = "token"

    def __init__(self, torch: Any, model: Any, batch: int) -> None:
        self.torch = torch
        self.model = model
        self.batch = batch
        self.name = f"gen-b{batch}"
        self.tokens = 16
        self.lead_tokens = 4
        vocab = int(model.config.vocab_size)
        self.ids = torch.randint(100, vocab, (batch, PROMPT_TOKENS), device="cuda")
        self.mask = torch.ones_like(self.ids)
        self.description = f"HF greedy generate, batch {batch}"

    def _generate(self, tokens: int) -> None:
        out = self.model.generate(
            input_ids=self.ids,
            attention_mask=self.mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )
        self.torch.cuda.synchronize()
        if out.shape[1] != PROMPT_TOKENS + tokens:
            raise BenchmarkError(f"generate gave {out.shape[1] - PROMPT_TOKENS} new tokens")

    def prepare(self, window_s: float, lead_in_s: float) -> None:
        self._generate(64)
        per_token = _timed(lambda: self._generate(64)) / 64
        self.tokens = max(16, round(window_s / per_token))
        self.lead_tokens = max(4, round(lead_in_s / per_token))
        # The first call at a new length pays one-off costs: warm up at the real ones.
        self._generate(self.lead_tokens)
        self._generate(self.tokens)
        warm = _timed(lambda: self._generate(self.tokens))
        self.description = (
            f"HF greedy generate, batch {self.batch}, {PROMPT_TOKENS}-token prompt, "
            f"{self.tokens} new tokens a window ({warm:.2f} s warm)"
        )

    def lead_in(self) -> None:
        self._generate(self.lead_tokens)

    def window(self) -> float:
        self._generate(self.tokens)
        return float(self.batch * self.tokens)


class Matmul:
    """The GPU-bound control: a fixed count of 8192^2 bf16 matmuls a window."""

    name = "matmul"
    unit = "TFLOP"

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        self.a = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
        self.b = torch.randn(MATMUL_N, MATMUL_N, device="cuda", dtype=torch.bfloat16)
        self.c = torch.empty_like(self.a)
        self.count = 1
        self.lead_count = 1
        self.description = f"{MATMUL_N}x{MATMUL_N} bf16 matmul loop"

    def _run(self, count: int) -> None:
        for _ in range(count):
            self.torch.mm(self.a, self.b, out=self.c)
        self.torch.cuda.synchronize()

    def prepare(self, window_s: float, lead_in_s: float) -> None:
        self._run(10)
        per = _timed(lambda: self._run(50)) / 50
        self.count = max(1, round(window_s / per))
        self.lead_count = max(1, round(lead_in_s / per))
        self._run(self.count)
        self.description = f"{MATMUL_N}x{MATMUL_N} bf16 matmul loop, {self.count} a window"

    def lead_in(self) -> None:
        self._run(self.lead_count)

    def window(self) -> float:
        self._run(self.count)
        return self.count * 2 * MATMUL_N**3 / 1e12


class EnergyMeter:
    """NVML's total-energy counter of the GPU torch uses, in joules."""

    def __init__(self, torch: Any) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        uuid = str(props.uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        try:
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except pynvml.NVMLError:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        self.read()

    def read(self) -> float:
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1e3

    def describe(self) -> str:
        name = self.nvml.nvmlDeviceGetName(self.handle)
        driver = self.nvml.nvmlSystemGetDriverVersion()
        return f"{name}, driver {driver}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


# -- weights the neighbour loads --------------------------------------------------------


def _fill(file: IO[bytes], nbytes: int, block: bytes) -> None:
    view = memoryview(block)
    while nbytes > 0:
        step = min(nbytes, len(view))
        file.write(view[:step])
        nbytes -= step


def write_raw_weights(path: Path, mb: int) -> int:
    """A file of random bytes for the read loader; flushed to disk so no writeback
    runs during the windows."""
    block = os.urandom(min(mb, 16) << 20)
    with path.open("wb") as file:
        _fill(file, mb << 20, block)
        file.flush()
        os.fsync(file.fileno())
    return mb << 20


def write_llama_weights(directory: Path, layers: int) -> int:
    """A random-weight Llama for `from_pretrained`: config.json + model.safetensors (the
    names and shapes come from a model built on the meta device; the values are one
    random bf16 block repeated). Returns the weights' size in bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**NEIGHBOUR_LLAMA, num_hidden_layers=layers)
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    block = (torch.randn(8 << 20) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    with (directory / "model.safetensors").open("wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for shape in shapes.values():
            _fill(file, 2 * math.prod(shape), block)
        file.flush()
        os.fsync(file.fileno())
    return offset


# -- measuring --------------------------------------------------------------------------


@dataclass(slots=True)
class Window:
    """One measured window: its work, time, energy, and what the neighbours did meanwhile."""

    workload: str
    index: int
    round: int
    condition: str
    seconds: float
    work: float
    energy_j: float | None
    neighbour_progress: int
    neighbour_cpu_s: float
    steal_s: float = 0.0  # CPU time the hypervisor gave to others, all CPUs (0 off a VM)
    stop_s: float | None = None  # how long the pause took to be seen
    resumed: bool | None = None  # CPU variant: the counter moved again after the pause

    @property
    def rate(self) -> float:
        return self.work / self.seconds

    @property
    def j_per_unit(self) -> float:
        return self.energy_j / self.work if self.energy_j is not None else math.nan


def measure_workload(
    workload: Workload,
    slots: Sequence[Slot],
    plain: Neighbour,
    confined: Neighbour,
    settings: Settings,
    measurer_cpus: Sequence[int],
    meter: EnergyMeter | None,
) -> list[Window]:
    """Run the schedule's windows for one workload."""
    all_cpus = sorted(os.sched_getaffinity(0))
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    neighbours = (plain, confined)
    windows: list[Window] = []
    try:
        for index, slot in enumerate(slots):
            condition = slot.condition
            cpu = "cpu" in condition
            paused = condition.startswith("pause")
            active = None if condition == ALONE else (confined if cpu else plain)
            for neighbour in neighbours:
                if neighbour is active and neighbour.paused:
                    neighbour.resume()
                elif neighbour is not active and not neighbour.paused:
                    neighbour.pause()
            pin_process(measurer_cpus if cpu else all_cpus)
            if settings.gap_s > 0:
                workload.lead_in()  # the active neighbour runs; the measurer works, unmeasured
            stop_s = active.pause() if paused and active is not None else None
            before = [(n.progress(), n.cpu_ticks()) for n in neighbours]
            steal_before = steal_ticks()
            energy_before = meter.read() if meter else None
            start = time.perf_counter()
            work = workload.window()
            seconds = time.perf_counter() - start
            energy_after = meter.read() if meter else None
            after = [(n.progress(), n.cpu_ticks()) for n in neighbours]
            steal = steal_ticks() - steal_before
            resumed = None
            if paused and active is not None:
                active.resume()
                if settings.check_resume:
                    resumed = active.wait_progress(active.progress(), RESUME_BOUND_S)
            windows.append(
                Window(
                    workload=workload.name,
                    index=index,
                    round=slot.round,
                    condition=condition,
                    seconds=seconds,
                    work=work,
                    energy_j=(
                        energy_after - energy_before
                        if energy_before is not None and energy_after is not None
                        else None
                    ),
                    neighbour_progress=sum(a[0] - b[0] for a, b in zip(after, before, strict=True)),
                    neighbour_cpu_s=sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
                    * tick_s,
                    steal_s=steal * tick_s,
                    stop_s=stop_s,
                    resumed=resumed,
                )
            )
    finally:
        pin_process(all_cpus)
    return windows


# -- statistics and report --------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def cv(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    if len(finite) < 2 or statistics.fmean(finite) == 0:
        return math.nan
    return statistics.stdev(finite) / statistics.fmean(finite)


@dataclass(frozen=True, slots=True)
class ConditionStats:
    """One condition of one workload against its alone partners."""

    workload: str
    condition: str
    pairs: int
    rate_ratio: float
    rate_min: float
    rate_max: float
    j_ratio: float
    j_min: float
    j_max: float
    cv_rate_alone: float
    cv_rate: float
    cv_j_alone: float
    cv_j: float
    neighbour_cpu_s: float
    neighbour_progress: float
    steal_s: float


def condition_stats(
    windows: Sequence[Window], slots: Sequence[Slot], condition: str
) -> ConditionStats:
    pairs = [
        (windows[i], windows[slot.partner])
        for i, slot in enumerate(slots)
        if slot.condition == condition and slot.partner is not None
    ]
    rate = [c.rate / a.rate for c, a in pairs]
    joule = [c.j_per_unit / a.j_per_unit for c, a in pairs]
    sides = [c for c, _ in pairs], [a for _, a in pairs]
    return ConditionStats(
        workload=windows[0].workload,
        condition=condition,
        pairs=len(pairs),
        rate_ratio=_mean(rate),
        rate_min=min(rate, default=math.nan),
        rate_max=max(rate, default=math.nan),
        j_ratio=_mean(joule),
        j_min=min(joule, default=math.nan),
        j_max=max(joule, default=math.nan),
        cv_rate_alone=cv([w.rate for w in sides[1]]),
        cv_rate=cv([w.rate for w in sides[0]]),
        cv_j_alone=cv([w.j_per_unit for w in sides[1]]),
        cv_j=cv([w.j_per_unit for w in sides[0]]),
        neighbour_cpu_s=_mean([w.neighbour_cpu_s for w in sides[0]]),
        neighbour_progress=_mean([float(w.neighbour_progress) for w in sides[0]]),
        steal_s=_mean([w.steal_s for w in sides[0]]),
    )


def _f(value: float, digits: int = 3) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _range(low: float, high: float) -> str:
    return "-" if math.isnan(low) else f"{low:.3f}..{high:.3f}"


def cv_ok(cv_cond: float, cv_alone: float) -> bool:
    """No wider than alone's, up to sampling noise (a NaN cv, no energy, passes)."""
    if math.isnan(cv_cond) or math.isnan(cv_alone):
        return True
    return cv_cond <= CV_FACTOR * cv_alone + CV_SLACK


def alone_line(workload: Workload, windows: Sequence[Window]) -> str:
    """The alone baseline of one workload, in its own units."""
    alone = [w for w in windows if w.condition == ALONE]
    return (
        f"  {workload.name}: {workload.description}; alone ({len(alone)} windows): "
        f"{_mean([w.rate for w in alone]):.2f} {workload.unit}/s "
        f"(cv {_f(cv([w.rate for w in alone]))}), "
        f"{_f(_mean([w.j_per_unit for w in alone]), 4)} J/{workload.unit} "
        f"(cv {_f(cv([w.j_per_unit for w in alone]))}), "
        f"{_mean([w.seconds for w in alone]):.2f} s a window, "
        f"steal {_mean([w.steal_s for w in alone]):.2f} CPU-s a window"
    )


def print_stats(stats: Sequence[ConditionStats]) -> None:
    table(
        [
            "workload",
            "condition",
            "pairs",
            "tput ratio",
            "pair min..max",
            "J/unit ratio",
            "pair min..max",
            "cv tput alone/cond",
            "cv J alone/cond",
            "nb CPU s/win",
            "nb progress/win",
            "steal s/win",
        ],
        [
            [
                s.workload,
                s.condition,
                s.pairs,
                _f(s.rate_ratio),
                _range(s.rate_min, s.rate_max),
                _f(s.j_ratio),
                _range(s.j_min, s.j_max),
                f"{_f(s.cv_rate_alone)} / {_f(s.cv_rate)}",
                f"{_f(s.cv_j_alone)} / {_f(s.cv_j)}",
                _f(s.neighbour_cpu_s, 2),
                _f(s.neighbour_progress, 1),
                _f(s.steal_s, 2),
            ]
            for s in stats
        ],
    )


def report(
    ctx: Context,
    settings: Settings,
    results: Sequence[tuple[Workload, list[Window]]],
    slots: Sequence[Slot],
) -> list[ConditionStats]:
    """The table of every workload x condition, the alone baselines, and the verdicts."""
    stats: list[ConditionStats] = []
    print("  all workloads:")
    for workload, windows in results:
        print(alone_line(workload, windows))
        stats += [condition_stats(windows, slots, c) for c in CONDITIONS]
    print_stats(stats)
    print(
        "  (ratios: condition/alone, mean over pairs; J/unit from NVML's total-energy "
        "counter; nb: the neighbours' own CPU time and progress counter (loads, or 8 MiB "
        "chunks for `read`) during the condition's windows, summed over both neighbours)"
    )
    check_mechanisms(ctx, settings, [w for _, ws in results for w in ws])
    if settings.mode != "gpu":
        print(
            "  (CPU variant: the ratios are shown, not judged; it checks that the "
            "mechanisms work, the GPU variant what they are worth)"
        )
        return stats
    for s in stats:
        if s.condition != "pause":
            continue
        ctx.check(
            f"{s.workload}: pause/alone throughput",
            _f(s.rate_ratio),
            f"within {RATIO_TOLERANCE:.0%} of 1",
            abs(s.rate_ratio - 1) <= RATIO_TOLERANCE,
        )
        ctx.check(
            f"{s.workload}: pause/alone J/unit",
            _f(s.j_ratio),
            f"within {RATIO_TOLERANCE:.0%} of 1",
            not math.isnan(s.j_ratio) and abs(s.j_ratio - 1) <= RATIO_TOLERANCE,
        )
        ctx.check(
            f"{s.workload}: pause window cv (tput; J/unit), alone vs pause",
            f"{_f(s.cv_rate_alone)} vs {_f(s.cv_rate)}; {_f(s.cv_j_alone)} vs {_f(s.cv_j)}",
            f"<= {CV_FACTOR}x alone's + {CV_SLACK}",
            cv_ok(s.cv_rate, s.cv_rate_alone) and cv_ok(s.cv_j, s.cv_j_alone),
        )
    return stats


def check_mechanisms(ctx: Context, settings: Settings, windows: Sequence[Window]) -> None:
    """The functional checks: quiet neighbours where they should be, busy where not."""
    quiet = [w for w in windows if w.condition == ALONE or w.condition.startswith("pause")]
    frozen = [w for w in quiet if w.neighbour_progress == 0 and w.neighbour_cpu_s == 0]
    stops = [w.stop_s for w in windows if w.stop_s is not None]
    print(
        f"  pause: SIGSTOP -> every thread seen stopped in median "
        f"{statistics.median(stops) * 1e3:.2f} ms, max {max(stops) * 1e3:.2f} ms"
        if stops
        else "  pause: no paused windows"
    )
    ctx.check(
        "neighbours frozen in paused and alone windows (progress and CPU time unchanged)",
        f"{len(frozen)}/{len(quiet)}",
        "all",
        len(frozen) == len(quiet),
    )
    busy = {
        name: sum(w.neighbour_cpu_s for w in windows if w.condition in conditions)
        for name, conditions in (("plain", ("none",)), ("confined", ("cpu",)))
    }
    ctx.check(
        "neighbours worked in unpaused windows (CPU s: plain in none, confined in cpu)",
        ", ".join(f"{k} {v:.2f}" for k, v in busy.items()),
        "> 0 each",
        all(v > 0 for v in busy.values()),
    )
    if settings.check_resume:
        paused = [w for w in windows if w.resumed is not None]
        moved = [w for w in paused if w.resumed]
        ctx.check(
            f"neighbour's counter moved again after each pause (within {RESUME_BOUND_S:g} s)",
            f"{len(moved)}/{len(paused)}",
            "all",
            len(moved) == len(paused) and bool(paused),
        )


# -- the run ----------------------------------------------------------------------------


def _gpu_workloads(settings: Settings) -> tuple[list[Workload], EnergyMeter, str]:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    meter = EnergyMeter(torch)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**MEASURED_LLAMA))
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    workloads: list[Workload] = []
    for name in settings.workloads:
        if name.startswith("gen-b"):
            workloads.append(Generate(torch, model, int(name.removeprefix("gen-b"))))
        elif name == "matmul":
            workloads.append(Matmul(torch))
        else:
            raise BenchmarkError(f"unknown GPU workload {name!r}")
    machine = (
        f"{meter.describe()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {os.cpu_count()} cores; kernel {platform.release()}"
    )
    return workloads, meter, machine


def _run_sync(ctx: Context, settings: Settings, json_path: Path | None) -> None:
    if settings.mode == "gpu" and (problem := gpu_problem()) is not None:
        raise BenchmarkError(f"GPU variant asked for, but {problem}")
    slots = schedule(settings.rounds)
    measurer_cpus, neighbour_cpus = split_cpus(sorted(os.sched_getaffinity(0)))
    confine = Confinement(neighbour_cpus)
    if settings.loader == "read":
        weights = ctx.workdir / "weights.bin"
        size = write_raw_weights(weights, settings.neighbour_mb)
    else:
        weights = ctx.workdir / "neighbour-model"
        size = write_llama_weights(weights, settings.neighbour_layers)
    print(
        f"  {settings.mode} variant: {settings.rounds} rounds x {len(slots) // settings.rounds} "
        f"windows "
        f"({settings.rounds} pairs per condition), windows of ~{settings.window_s:g} s "
        f"after a {settings.gap_s:g} s lead-in; neighbour: `{settings.loader}` of "
        f"{size / 1e9:.2f} GB in a loop"
    )
    neighbours: list[Neighbour] = []
    meter: EnergyMeter | None = None
    try:
        neighbours.append(Neighbour("plain", ctx.workdir, weights, settings.loader))
        neighbours.append(Neighbour("confined", ctx.workdir, weights, settings.loader, confine))
        if settings.mode == "gpu":
            workloads, meter, machine = _gpu_workloads(settings)
        else:
            workloads = [PythonLoop()]
            machine = f"{os.cpu_count()} cores, kernel {platform.release()}, no GPU"
        print(f"  machine: {machine}")
        for neighbour in neighbours:
            if not neighbour.wait_progress(0, 300 if settings.mode == "gpu" else 60):
                raise BenchmarkError(f"neighbour {neighbour.name} made no progress")
        mismatch = confine.read_back(neighbours[1].pid)
        ctx.check(
            "cpu confinement read back (affinity, nice, I/O class)",
            f"neighbour cpus {cpu_list(confine.cpus)}, nice {confine.nice}, io idle; "
            f"measurer cpus {cpu_list(measurer_cpus)} in cpu windows",
            "as asked",
            mismatch is None,
        )
        if mismatch:
            print(f"  confinement: {mismatch}")
        for neighbour in neighbours:
            neighbour.pause()
        results: list[tuple[Workload, list[Window]]] = []
        for workload in workloads:
            workload.prepare(settings.window_s, settings.gap_s)
            windows = measure_workload(
                workload, slots, neighbours[0], neighbours[1], settings, measurer_cpus, meter
            )
            results.append((workload, windows))
            _write_json(json_path, settings, machine, slots, results)
            if len(workloads) > 1:  # as it goes: a run cut short still leaves its tables
                print(alone_line(workload, windows))
                print_stats([condition_stats(windows, slots, c) for c in CONDITIONS])
        stats = report(ctx, settings, results, slots)
    finally:
        for neighbour in neighbours:
            neighbour.close()
        if meter is not None:
            meter.close()
    _write_json(json_path, settings, machine, slots, results, stats)


def _write_json(
    path: Path | None,
    settings: Settings,
    machine: str,
    slots: Sequence[Slot],
    results: Sequence[tuple[Workload, list[Window]]],
    stats: Sequence[ConditionStats] = (),
) -> None:
    """Every window so far (rewritten after each workload: a run cut short keeps them)."""
    if path is None:
        return
    document = {
        "settings": dataclasses.asdict(settings),
        "environment": environment(),
        "machine": machine,
        "workloads": {w.name: w.description for w, _ in results},
        "slots": [dataclasses.asdict(s) for s in slots],
        "stats": [dataclasses.asdict(s) for s in stats],
        "windows": [dataclasses.asdict(w) for _, ws in results for w in ws],
    }
    path.write_text(json.dumps(document, indent=1))


async def measure(ctx: Context, settings: Settings, json_path: Path | None = None) -> None:
    """Run one configuration (blocking work in a thread, off the event loop)."""
    await anyio.to_thread.run_sync(functools.partial(_run_sync, ctx, settings, json_path))


async def run(ctx: Context) -> None:
    await measure(ctx, default_settings(detect_mode(), ctx.smoke))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.interference", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--smoke", action="store_true", help="the smoke sizes")
    parser.add_argument("--mode", choices=("gpu", "cpu"), help="default: gpu where it can run")
    parser.add_argument("--rounds", type=int, help="pairs per condition")
    parser.add_argument("--window-s", type=float, help="seconds of work per window")
    parser.add_argument("--gap-s", type=float, help="seconds between windows")
    parser.add_argument("--workloads", help=f"comma-separated: {', '.join(GPU_WORKLOADS)}")
    parser.add_argument("--loader", choices=sorted(LOADERS), help="what the neighbour runs")
    parser.add_argument("--json", type=Path, help="write every window here")
    # The neighbour process (internal).
    parser.add_argument("--neighbour", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cpus", help=argparse.SUPPRESS)
    parser.add_argument("--nice", type=int, default=19, help=argparse.SUPPRESS)
    parser.add_argument("--idle-io", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.neighbour is not None:
        confine = (
            Confinement(tuple(int(c) for c in args.cpus.split(",")), args.nice, args.idle_io)
            if args.cpus
            else None
        )
        neighbour_main(args.neighbour, args.progress, args.loader or "read", confine)
        return 0
    settings = default_settings(args.mode or detect_mode(), args.smoke)
    overrides = {
        "rounds": args.rounds,
        "window_s": args.window_s,
        "gap_s": args.gap_s,
        "loader": args.loader,
        "workloads": tuple(args.workloads.split(",")) if args.workloads else None,
    }
    settings = dataclasses.replace(
        settings, **{k: v for k, v in overrides.items() if v is not None}
    )
    print(f"=== {NAME}: {TITLE} ===")
    print(f"  {environment()}")
    workdir = Path(tempfile.mkdtemp(prefix=f"llem-bench-{NAME}-"))
    ctx = Context(name=NAME, smoke=args.smoke, workdir=workdir)
    start = time.perf_counter()
    try:
        anyio.run(measure, ctx, settings, args.json)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    passed = sum(v.passed for v in ctx.verdicts)
    print(f"  ({NAME}: {time.perf_counter() - start:.1f} s; {passed}/{len(ctx.verdicts)} met)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
