"""GPU telemetry: one sampler thread per host reading NVML, and energy over any window.

The sampler runs off the event loop on its own thread; what it reads goes to a
gzip CSV (pandas reads it as is) and to a bounded in-memory history from which
`energy_between` answers, by interpolating NVML's total-energy counter.
NVML's counter and power change about every 100 ms (DESIGN.md), so a window
shorter than `SHORT_WINDOW_S` is flagged rather than trusted.
"""

from __future__ import annotations

import bisect
import collections
import gzip
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import structlog

from llem_dispatch.gpu.discovery import _handle, _nvml_init, _pynvml

__all__ = [
    "CSV_COLUMNS",
    "SHORT_WINDOW_S",
    "EnergyWindow",
    "NvmlTelemetry",
    "Sample",
    "SampleSource",
    "TelemetryReader",
    "TelemetrySampler",
    "append_samples",
    "counter_at",
    "window_energy",
]

log = structlog.get_logger("llem_dispatch.gpu")

#: Windows shorter than this are flagged: the counter's 100 ms steps are >5% of them.
SHORT_WINDOW_S = 2.0
#: NVML field ids (nvml.h): total energy since driver load (mJ), instant power (mW).
FI_TOTAL_ENERGY = 83
FI_POWER_INSTANT = 186
#: nvmlFieldValue_t.valueType -> the union member holding the value.
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of one GPU; None where NVML did not say (or it was not read this time)."""

    t: float
    gpu: str
    power_w: float | None = None
    energy_j: float | None = None
    temperature_c: float | None = None
    sm_util_pct: float | None = None
    mem_used_mb: float | None = None
    sm_clock_mhz: float | None = None


#: The telemetry file's columns, in order (a `Sample`'s fields).
CSV_COLUMNS = tuple(f.name for f in fields(Sample))


class TelemetryReader(Protocol):
    """Reads every device once; `detail` asks for the slower fields too."""

    def read(self, detail: bool) -> list[Sample]:
        """One sample per device."""
        ...


class SampleSource(Protocol):
    """Where energy over a window is read from: the sampler here, or an attempt's samples
    shipped back from the node that ran it."""

    def samples_of(self, gpu: str, start: float, end: float, margin: float = 1.0) -> list[Sample]:
        """This GPU's samples from `start - margin` to `end + margin`, by time."""
        ...


class NvmlTelemetry:
    """NVML reads: energy and power in one `nvmlDeviceGetFieldValues` call per GPU;
    temperature, SM utilisation, memory and SM clock (one call each) when `detail`.

    `nvml` is the pynvml module (a fake one in tests); by default the installed one.
    """

    def __init__(self, devices: Sequence[str], nvml: Any | None = None) -> None:
        module = nvml if nvml is not None else _pynvml()
        if module is None:
            raise RuntimeError("pynvml is not installed (pip install 'llem-dispatch[nvml]')")
        self._nvml: Any = module
        if nvml is None:
            _nvml_init()
        self._handles = [(d, _handle(self._nvml, d)) for d in devices]
        self._fields_ok = True

    def read(self, detail: bool) -> list[Sample]:
        """One `Sample` per device, stamped with the time of its own read."""
        return [self._one(device, handle, detail) for device, handle in self._handles]

    def _one(self, device: str, handle: Any, detail: bool) -> Sample:
        nv = self._nvml
        t = time.time()
        energy_mj, power_mw = self._fields(handle)
        if power_mw is None:
            power_mw = _ask(lambda: nv.nvmlDeviceGetPowerUsage(handle))
        if energy_mj is None and not self._fields_ok:
            energy_mj = _ask(lambda: nv.nvmlDeviceGetTotalEnergyConsumption(handle))
        sample = Sample(
            t=t,
            gpu=device,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            energy_j=energy_mj / 1000.0 if energy_mj is not None else None,
        )
        if not detail:
            return sample
        util = _ask(lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu)
        memory = _ask(lambda: nv.nvmlDeviceGetMemoryInfo(handle).used)
        return Sample(
            t=t,
            gpu=device,
            power_w=sample.power_w,
            energy_j=sample.energy_j,
            temperature_c=_ask(lambda: nv.nvmlDeviceGetTemperature(handle, 0)),
            sm_util_pct=util,
            mem_used_mb=memory / 2**20 if memory is not None else None,
            sm_clock_mhz=_ask(lambda: nv.nvmlDeviceGetClockInfo(handle, nv.NVML_CLOCK_SM)),
        )

    def _fields(self, handle: Any) -> tuple[float | None, float | None]:
        """(energy mJ, power mW) from one batched call; Nones where unsupported."""
        if not self._fields_ok:
            return None, None
        try:
            values = self._nvml.nvmlDeviceGetFieldValues(
                handle, [FI_TOTAL_ENERGY, FI_POWER_INSTANT]
            )
        except Exception as exc:  # noqa: BLE001 - an old driver: one call per field instead
            log.debug("gpu_field_values_unavailable", error=repr(exc))
            self._fields_ok = False
            return None, None
        energy, power = (_field_value(v) for v in values)
        return energy, power


def _field_value(value: Any) -> float | None:
    if getattr(value, "nvmlReturn", 1) != 0:
        return None
    member = _VALUE_MEMBERS.get(int(getattr(value, "valueType", -1)))
    raw = getattr(value.value, member, None) if member else None
    return float(raw) if raw is not None else None


def _ask(read: Callable[[], Any]) -> float | None:
    """One NVML read; unknown (None) when it fails, as discovery treats every reading."""
    try:
        return float(read())
    except Exception:  # noqa: BLE001 - a field this GPU lacks is unknown, never fatal
        return None


# -- energy over a window, from the samples -----------------------------------------------


def counter_at(points: Sequence[tuple[float, float]], t: float) -> float | None:
    """The energy counter at time `t`, linearly between the samples around it.

    `points` are (time, counter) sorted by time; None when `t` is outside them.
    """
    if not points or t < points[0][0] or t > points[-1][0]:
        return None
    index = bisect.bisect_left(points, (t, float("-inf")))
    if points[index][0] == t:
        return points[index][1]
    (t0, e0), (t1, e1) = points[index - 1], points[index]
    return e0 + (e1 - e0) * (t - t0) / (t1 - t0)


def _power_integral(points: Sequence[tuple[float, float]], t0: float, t1: float) -> float | None:
    """Trapezoidal integral of (time, watts) over [t0, t1]; None outside the samples."""
    start, end = counter_at(points, t0), counter_at(points, t1)
    if start is None or end is None:
        return None
    inner = [p for p in points if t0 < p[0] < t1]
    curve = [(t0, start), *inner, (t1, end)]
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in itertools.pairwise(curve))


@dataclass(frozen=True, slots=True)
class EnergyWindow:
    """Energy of one GPU over [start, end]: from the counter, else from integrated power."""

    start: float
    end: float
    energy_j: float | None
    source: str
    #: The window is shorter than `SHORT_WINDOW_S`: the figure is noisy.
    short: bool

    @property
    def duration_s(self) -> float:
        """The window's length."""
        return self.end - self.start


def window_energy(samples: Sequence[Sample], start: float, end: float) -> EnergyWindow:
    """Energy over [start, end] from one GPU's samples (sorted by time)."""
    short = end - start < SHORT_WINDOW_S
    counter = [(s.t, s.energy_j) for s in samples if s.energy_j is not None]
    a, b = counter_at(counter, start), counter_at(counter, end)
    if a is not None and b is not None:
        return EnergyWindow(start, end, b - a, "counter", short)
    power = [(s.t, s.power_w) for s in samples if s.power_w is not None]
    integral = _power_integral(power, start, end)
    return EnergyWindow(start, end, integral, "power" if integral is not None else "none", short)


# -- the sampler thread ---------------------------------------------------------------------


class TelemetrySampler:
    """Samples `reader` every `interval_s` on a thread; keeps `keep_s` of history per GPU.

    Slower fields are read every `detail_s`. With `path`, samples are appended to
    a gzip CSV there every `flush_s` (one gzip member per flush: a crash loses at
    most that much). CPU spent by the thread is counted (`cpu_s`), to show its cost.
    """

    def __init__(
        self,
        reader: TelemetryReader,
        *,
        interval_s: float = 0.1,
        detail_s: float = 1.0,
        path: Path | None = None,
        keep_s: float = 3600.0,
        flush_s: float = 5.0,
    ) -> None:
        self._reader = reader
        self.interval_s = interval_s
        self._detail_every = max(1, round(detail_s / interval_s))
        self.path = path
        self._flush_s = flush_s
        self._history: dict[str, collections.deque[Sample]] = {}
        self._keep = max(10, int(keep_s / interval_s))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[str] = []
        self.samples = 0
        self.errors = 0
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.last_t = 0.0

    def start(self) -> None:
        """Start the thread (a daemon: a crashed study never waits on it)."""
        self._thread = threading.Thread(target=self._run, name="llem-telemetry", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (bounded wait) and write what is pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._flush()

    def samples_of(self, gpu: str, start: float, end: float, margin: float = 1.0) -> list[Sample]:
        """This GPU's samples from `start - margin` to `end + margin`, by time."""
        with self._lock:
            history = list(self._history.get(gpu, ()))
        return [s for s in history if start - margin <= s.t <= end + margin]

    def history(self) -> list[Sample]:
        """Every sample kept, GPU by GPU, each GPU's by time."""
        with self._lock:
            return [s for samples in self._history.values() for s in samples]

    def _run(self) -> None:
        started_wall, started_cpu = time.monotonic(), time.thread_time()
        last_flush = started_wall
        tick = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                batch = self._reader.read(detail=tick % self._detail_every == 0)
            except Exception as exc:  # noqa: BLE001 - one failed read is a gap, not the end
                self.errors += 1
                log.debug("gpu_telemetry_read_failed", error=repr(exc))
                batch = []
            self._keep_batch(batch)
            tick += 1
            now = time.monotonic()
            if self.path is not None and now - last_flush >= self._flush_s:
                self._flush()
                last_flush = now
            self.cpu_s = time.thread_time() - started_cpu
            self.wall_s = now - started_wall
            # A fixed rate, not a fixed pause: reads that take time do not stretch it.
            next_at += self.interval_s
            next_at = max(next_at, now)
            self._stop.wait(next_at - now)

    def _keep_batch(self, batch: list[Sample]) -> None:
        with self._lock:
            for sample in batch:
                history = self._history.get(sample.gpu)
                if history is None:
                    history = self._history[sample.gpu] = collections.deque(maxlen=self._keep)
                history.append(sample)
                self.last_t = max(self.last_t, sample.t)
            self.samples += len(batch)
            if self.path is not None:
                self._pending.extend(_csv_line(s) for s in batch)

    def _flush(self) -> None:
        if self.path is None:
            return
        with self._lock:
            lines, self._pending = self._pending, []
        _append_lines(self.path, lines)

    def cost(self) -> dict[str, float | int]:
        """What sampling cost: CPU seconds, the share of one core, per sample."""
        per_read = self.samples / max(1, len(self._history))
        return {
            "samples": self.samples,
            "errors": self.errors,
            "interval_s": self.interval_s,
            "wall_s": round(self.wall_s, 3),
            "cpu_s": round(self.cpu_s, 4),
            "cpu_share": round(self.cpu_s / self.wall_s, 5) if self.wall_s else 0.0,
            "cpu_ms_per_read": round(1000 * self.cpu_s / per_read, 4) if per_read else 0.0,
        }


#: One writer at a time per process: the sampler's thread and samples shipped from nodes.
_WRITING = threading.Lock()


def append_samples(path: Path, samples: Sequence[Sample]) -> None:
    """Append `samples` to the telemetry file at `path` (one gzip member; header if new)."""
    _append_lines(path, [_csv_line(s) for s in samples])


def _append_lines(path: Path, lines: list[str]) -> None:
    if not lines:
        return
    with _WRITING:
        header = "" if path.exists() else ",".join(CSV_COLUMNS) + "\n"
        try:
            with gzip.open(path, "at", encoding="utf-8") as out:
                out.write(header + "".join(lines))
        except OSError as exc:
            log.warning("gpu_telemetry_write_failed", path=str(path), error=repr(exc))


def _csv_line(sample: Sample) -> str:
    return ",".join("" if v is None else _number(v) for v in astuple(sample)) + "\n"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    return str(value)
