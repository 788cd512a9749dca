"""A study's GPU telemetry: the sampler's start and stop, and each record's own energy.

Per experiment: the energy counter of each of its GPUs at start and at exit, and,
where the study names the result's own window (`measure: {start, end, energy}`),
the energy over exactly that window beside the workload's figure, with their ratio.
On this host the study's sampler reads its GPUs; where attempts run elsewhere (Ray,
Slurm) each is sampled there (`node_telemetry`) and its samples come back with its
record: the same figures from them, and the same telemetry file (`record_energy`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import structlog

from llem_dispatch.dispatch import RunRecord
from llem_dispatch.gpu.attempt_telemetry import (
    AttemptTelemetry,
    NodeTelemetry,
    load_reader_factory,
    reader_from_env,
)
from llem_dispatch.gpu.telemetry import (
    NvmlTelemetry,
    SampleSource,
    TelemetryReader,
    TelemetrySampler,
    append_samples,
    counter_at,
    window_energy,
)
from llem_dispatch.study.adaptive import result_field
from llem_dispatch.study.schema import Study

__all__ = [
    "TELEMETRY_FILE",
    "energy_block",
    "node_telemetry",
    "record_energy",
    "start_telemetry",
    "wait_for_samples",
]

log = structlog.get_logger("llem_dispatch.study")

TELEMETRY_FILE = "telemetry.csv.gz"


def start_telemetry(
    study: Study,
    devices: Sequence[str],
    results_path: Path,
    *,
    reader: TelemetryReader | None = None,
) -> TelemetrySampler | None:
    """A started sampler for `devices`, or None (off, virtual GPUs, or no NVML).

    `reader` replaces NVML (tests), as does the test switch `LLEM_TELEMETRY_READER`;
    with `telemetry: {enabled: true}` it samples whatever the reader reads, even
    without real devices.
    """
    spec = study.telemetry
    if reader is None and devices and spec.enabled is not False and (path := reader_from_env()):
        reader = load_reader_factory(path)(devices)
    if spec.enabled is False or (not devices and reader is None):
        return None
    if reader is None:
        try:
            reader = NvmlTelemetry(devices)
        except Exception as exc:  # noqa: BLE001 - no telemetry is a warning, never a failure
            level = log.warning if spec.enabled else log.info
            level("gpu_telemetry_unavailable", devices=list(devices), error=repr(exc))
            return None
    sampler = TelemetrySampler(
        reader,
        interval_s=spec.interval_s,
        detail_s=max(spec.detail_interval_s or spec.interval_s, spec.interval_s),
        path=results_path / TELEMETRY_FILE,
    )
    sampler.start()
    return sampler


def node_telemetry(study: Study) -> NodeTelemetry | None:
    """What each attempt samples where it runs (placements away from this host), or None
    when the study turns telemetry off. Raises `ConfigError` for a bad test switch."""
    spec = study.telemetry
    if spec.enabled is False:
        return None
    return NodeTelemetry(
        enabled=spec.enabled,
        interval_s=spec.interval_s,
        detail_s=max(spec.detail_interval_s or spec.interval_s, spec.interval_s),
        reader=reader_from_env(),
    )


async def record_energy(
    sampler: TelemetrySampler | None,
    record: RunRecord,
    measure: Mapping[str, str],
    results_path: Path,
) -> dict[str, Any] | None:
    """The record's `telemetry` block, from the samples its node took (also appended to the
    study's telemetry file) or else from this host's sampler; None without either."""
    shipped = record.node_telemetry
    if shipped is not None:
        path = results_path / TELEMETRY_FILE
        await anyio.to_thread.run_sync(append_samples, path, shipped.to_samples())
        payload = record.model_dump(mode="json")
        block = energy_block(shipped, record, measure, payload, gpus=shipped.gpus)
        if block is not None:
            block["sampler"] = _node_sampler(shipped)
        return block
    if sampler is None or record.exited_at is None:
        return None
    await wait_for_samples(sampler, record.exited_at.timestamp())
    return energy_block(sampler, record, measure, record.model_dump(mode="json"))


def _node_sampler(shipped: AttemptTelemetry) -> dict[str, Any]:
    """What sampling cost where the attempt ran (it shared that host with the run)."""
    return {
        "where": "node",
        "samples": len(shipped.samples),
        "errors": shipped.errors,
        "interval_s": shipped.interval_s,
        "cpu_s": shipped.cpu_s,
    }


async def wait_for_samples(sampler: TelemetrySampler, t: float) -> None:
    """Until the sampler has read past time `t` (bounded: a few intervals)."""
    for _ in range(8):
        if sampler.last_t >= t:
            return
        await anyio.sleep(sampler.interval_s / 2)


def _epoch(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def energy_block(
    sampler: SampleSource,
    record: RunRecord,
    measure: Mapping[str, str],
    payload: Mapping[str, Any],
    *,
    gpus: Sequence[str] | None = None,
) -> dict[str, Any] | None:
    """The record's `telemetry` block: energy per GPU over the run and over its window.

    `sampler` is this host's sampler or the samples shipped from the attempt's node;
    `gpus` names the GPUs as sampled (default: the record's `gpu_ids`).
    """
    gpu_ids = list(gpus) if gpus is not None else record.gpu_ids
    start = _epoch(record.gate_opened_at or record.started_at)
    end = _epoch(record.exited_at)
    if start is None or end is None or not gpu_ids:
        return None
    block: dict[str, Any] = {"run": _run_energy(sampler, gpu_ids, start, end)}
    if measure and record.status == "succeeded":
        block["window"] = _window(sampler, gpu_ids, measure, payload)
    return block


def _run_energy(
    sampler: SampleSource, gpu_ids: list[str], start: float, end: float
) -> dict[str, Any]:
    gpus: dict[str, dict[str, float | None]] = {}
    for gpu in gpu_ids:
        samples = sampler.samples_of(gpu, start, end)
        points = [(s.t, s.energy_j) for s in samples if s.energy_j is not None]
        first, last = counter_at(points, start), counter_at(points, end)
        gpus[gpu] = {
            "energy_start_j": first,
            "energy_exit_j": last,
            "energy_j": last - first if first is not None and last is not None else None,
        }
    return {
        "start": start,
        "end": end,
        "gpus": gpus,
        "energy_j": _total(g["energy_j"] for g in gpus.values()),
    }


def _window(
    sampler: SampleSource,
    gpu_ids: list[str],
    measure: Mapping[str, str],
    payload: Mapping[str, Any],
) -> dict[str, Any]:
    start = result_field(payload, measure["start"])
    end = result_field(payload, measure["end"])
    if start is None or end is None or end <= start:
        return {"error": f"no window: {measure['start']}={start}, {measure['end']}={end}"}
    windows = {g: window_energy(sampler.samples_of(g, start, end), start, end) for g in gpu_ids}
    ours = _total(w.energy_j for w in windows.values())
    reported = result_field(payload, measure["energy"]) if "energy" in measure else None
    duration = end - start
    block: dict[str, Any] = {
        "start": start,
        "end": end,
        "duration_s": round(duration, 6),
        "short": any(w.short for w in windows.values()),
        "source": sorted({w.source for w in windows.values()}),
        "gpus": {g: w.energy_j for g, w in windows.items()},
        "energy_j": ours,
        "reported_j": reported,
        "ratio": ours / reported if ours is not None and reported else None,
    }
    if block["short"]:
        log.warning(
            "energy_window_short",
            duration_s=round(duration, 3),
            note="NVML's counter steps every ~100 ms: under 2 s the figure is noisy",
        )
    return block


def _total(values: Any) -> float | None:
    numbers = list(values)
    if not numbers or any(v is None or not math.isfinite(v) for v in numbers):
        return None
    return float(sum(numbers))
