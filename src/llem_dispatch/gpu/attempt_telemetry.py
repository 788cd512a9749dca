"""GPU telemetry where an attempt runs (a Ray node, a Slurm job), and its samples on the wire.

The driver's sampler reads only its own host. A placement whose attempts run
elsewhere hands each one a `NodeTelemetry` (the study's `telemetry:` as plain
values); there the attempt's GPUs are sampled with the same reader interface as
on the driver (NVML by default), from before the runner starts until past its
exit, and the samples travel back in the attempt's report as `AttemptTelemetry`.
The driver then reads energy from them exactly as from its own sampler.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, fields
from typing import Any, cast

import anyio
import structlog
from pydantic import BaseModel, ConfigDict, PrivateAttr

from llem_dispatch.errors import ConfigError
from llem_dispatch.gpu.telemetry import (
    CSV_COLUMNS,
    NvmlTelemetry,
    Sample,
    TelemetryReader,
    TelemetrySampler,
)

__all__ = [
    "READER_ENV",
    "AttemptSampling",
    "AttemptTelemetry",
    "NodeTelemetry",
    "ReaderFactory",
    "load_reader_factory",
    "reader_from_env",
]

log = structlog.get_logger("llem_dispatch.gpu")

#: TEST SWITCH: `module:factory` of a telemetry reader used instead of NVML, on the
#: driver's host and (shipped with each attempt) on every node. For CI, where there is
#: no NVML; never needed on real GPUs. See `load_reader_factory`.
READER_ENV = "LLEM_TELEMETRY_READER"

#: Called with an attempt's GPU ids (UUIDs where NVML knows them); returns their reader.
ReaderFactory = Callable[[Sequence[str]], TelemetryReader]

#: An attempt's samples kept for the report: longer attempts ship their last this many
#: seconds (at 0.1 s, 8 GPUs: about 1.2 M samples).
KEEP_S = 4 * 3600.0


def load_reader_factory(path: str) -> ReaderFactory:
    """The reader factory `path` names (`package.module:function`), importable here.

    A test switch (`LLEM_TELEMETRY_READER`): CI has no NVML, so a reader giving known
    power stands in for it. Raises `ConfigError` saying what is wrong with `path`.
    """
    fix = (
        f"{READER_ENV} is a test switch naming `package.module:factory`, a callable taking "
        "the GPU ids and returning a reader with `read(detail) -> list[Sample]`; unset it "
        "to read NVML."
    )
    module_name, sep, name = path.partition(":")
    if not sep or not module_name.strip() or not name.strip():
        raise ConfigError(f"telemetry reader {path!r} is not `module:factory`", fix_suggestion=fix)
    try:
        module = importlib.import_module(module_name.strip())
    except ImportError as exc:
        raise ConfigError(
            f"telemetry reader {path!r}: cannot import {module_name!r} ({exc})",
            fix_suggestion=fix,
        ) from exc
    factory = getattr(module, name.strip(), None)
    if not callable(factory):
        raise ConfigError(
            f"telemetry reader {path!r}: {module_name} has no callable {name!r}",
            fix_suggestion=fix,
        )
    return cast(ReaderFactory, factory)


def reader_from_env() -> str | None:
    """The test switch's reader path (`LLEM_TELEMETRY_READER`), checked; None when unset."""
    path = os.environ.get(READER_ENV, "").strip()
    if not path:
        return None
    load_reader_factory(path)
    return path


@dataclass(frozen=True, slots=True)
class NodeTelemetry:
    """What each attempt samples where it runs: the study's `telemetry:` as plain values."""

    #: None: sample where NVML answers (off on virtual GPUs); True: warn where it cannot.
    enabled: bool | None = None
    interval_s: float = 0.1
    detail_s: float = 0.1
    #: A reader's `module:factory` instead of NVML: the test switch (`READER_ENV`).
    reader: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """As JSON-ready data (a Slurm job's spec)."""
        return asdict(self)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any] | None) -> NodeTelemetry | None:
        """Back from `to_wire`'s data (None for none)."""
        if not data:
            return None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def reader_for(self, gpus: Sequence[str]) -> TelemetryReader | None:
        """The reader of `gpus` here: the named factory's, else NVML's; None (logged) if none."""
        try:
            if self.reader is not None:
                return load_reader_factory(self.reader)(gpus)
            return NvmlTelemetry(gpus)
        except Exception as exc:  # noqa: BLE001 - no telemetry is a warning, never a failure
            level = log.warning if self.enabled or self.reader else log.info
            level("gpu_telemetry_unavailable", devices=list(gpus), error=repr(exc))
            return None


class AttemptTelemetry(BaseModel):
    """One attempt's GPU samples as its node took them: the wire format, and a sample
    source (`samples_of`) for the driver's energy figures."""

    model_config = ConfigDict(frozen=True)

    #: The attempt's GPUs as sampled (UUIDs where NVML knows them), in the record's order.
    gpus: list[str]
    interval_s: float
    #: Rows in `CSV_COLUMNS` order (a `Sample` each): compact on the wire.
    samples: list[list[Any]]
    #: Reads that failed (gaps), and the CPU seconds the sampler took on the node.
    errors: int = 0
    cpu_s: float = 0.0
    _by_gpu: dict[str, list[Sample]] | None = PrivateAttr(default=None)

    @classmethod
    def of(cls, sampler: TelemetrySampler, gpus: Sequence[str]) -> AttemptTelemetry:
        """What `sampler` kept of `gpus`."""
        return cls(
            gpus=list(gpus),
            interval_s=sampler.interval_s,
            samples=[list(astuple(s)) for s in sampler.history()],
            errors=sampler.errors,
            cpu_s=round(sampler.cpu_s, 4),
        )

    def to_samples(self) -> list[Sample]:
        """The rows as `Sample`s (for the study's telemetry file)."""
        return [s for samples in self._index().values() for s in samples]

    def samples_of(self, gpu: str, start: float, end: float, margin: float = 1.0) -> list[Sample]:
        """This GPU's samples from `start - margin` to `end + margin`, by time."""
        return [s for s in self._index().get(gpu, []) if start - margin <= s.t <= end + margin]

    def _index(self) -> dict[str, list[Sample]]:
        if self._by_gpu is None:
            by_gpu: dict[str, list[Sample]] = {}
            for row in self.samples:
                sample = _sample(row)
                if sample is not None:
                    by_gpu.setdefault(sample.gpu, []).append(sample)
            for samples in by_gpu.values():
                samples.sort(key=lambda s: s.t)
            self._by_gpu = by_gpu
        return self._by_gpu


def _sample(row: Sequence[Any]) -> Sample | None:
    """One wire row back as a `Sample` (None for a malformed one)."""
    if len(row) != len(CSV_COLUMNS) or not isinstance(row[0], int | float):
        return None
    values = [None if v is None else float(v) for v in row[2:]]
    return Sample(float(row[0]), str(row[1]), *values)


class AttemptSampling:
    """The sampler of one attempt's GPUs, started before its runner, finished past its exit."""

    def __init__(self, sampler: TelemetrySampler, gpus: Sequence[str]) -> None:
        self.sampler = sampler
        self.gpus = tuple(gpus)

    @classmethod
    def start(cls, spec: NodeTelemetry | None, gpus: Sequence[str]) -> AttemptSampling | None:
        """Sampling `gpus` now, or None (telemetry off, no GPUs, no reader here)."""
        if spec is None or spec.enabled is False or not gpus:
            return None
        reader = spec.reader_for(gpus)
        if reader is None:
            return None
        sampler = TelemetrySampler(
            reader, interval_s=spec.interval_s, detail_s=spec.detail_s, keep_s=KEEP_S
        )
        sampler.start()
        return cls(sampler, gpus)

    async def finish(self, exited_at: float | None) -> AttemptTelemetry:
        """Once sampled past `exited_at` (bounded: a few intervals), stopped: the samples."""
        interval = self.sampler.interval_s
        if exited_at is not None:
            for _ in range(8):
                if self.sampler.last_t >= exited_at + interval:
                    break
                await anyio.sleep(interval / 2)
        self.stop()
        return AttemptTelemetry.of(self.sampler, self.gpus)

    def stop(self) -> None:
        """Stop sampling (bounded: the thread wakes every interval); idempotent."""
        self.sampler.stop(timeout=2.0)
