"""What runs inside a Slurm job: `python -m llem_dispatch.slurm.job ATTEMPT_DIR`.

The attempt dir (on the filesystem the driver and the nodes share) holds
`spec.json` (the config, cooldown, thermal gate) and the study's pickled runner
factory beside it. The job sees the GPUs Slurm gave it (`CUDA_VISIBLE_DEVICES`),
waits out the cooldown and the thermal gate on those GPUs, then writes
`started.json` (node, job id, GPUs, their UUIDs and state), runs the attempt with
the study's runner kind (sampling its GPUs' telemetry meanwhile, when the spec
asks), and writes `outcome.json` (the result, the failure or the error, and the
attempt's report with those samples) atomically. SIGTERM (scancel, Slurm's time
limit) cancels the run, so the runner removes what it started before the job ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio

from llem_dispatch.dispatch.attempt import AttemptReport
from llem_dispatch.errors import error_payload
from llem_dispatch.gpu.attempt_telemetry import AttemptSampling, NodeTelemetry
from llem_dispatch.gpu.discovery import nvml_inventory, parse_visible_devices
from llem_dispatch.gpu.held import gpus_at_start, settle_after_exit
from llem_dispatch.gpu.thermal import SettleSpec
from llem_dispatch.models import ExperimentFailure, HashedConfig
from llem_dispatch.runners.protocol import RunInfo, Runner

__all__ = [
    "OUTCOME_FILE",
    "SPEC_FILE",
    "STARTED_FILE",
    "JobHost",
    "main",
    "write_json",
]

SPEC_FILE = "spec.json"
STARTED_FILE = "started.json"
OUTCOME_FILE = "outcome.json"


@dataclass(frozen=True, slots=True)
class JobHost:
    """The `HostContext` of the node a job runs on."""

    #: No NVIDIA GPU visible through NVML here: run without device requests.
    virtual: bool
    #: The node is the driver's own host.
    driver_host: bool


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` to `path` atomically (temp file + rename), so a reader sees all or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _gpus() -> tuple[tuple[str, ...], dict[str, str], bool]:
    """The GPUs Slurm gave this job, their UUIDs, and whether none is real here."""
    visible = parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES")) or []
    inventory, _reason = nvml_inventory()
    if not inventory:
        return tuple(visible), {}, not Path("/dev/nvidiactl").exists()
    by_index = dict(inventory)
    return tuple(visible), {i: by_index[i] for i in visible if i in by_index}, False


class _Observer:
    """Keeps what the runner says about the run, for the outcome file."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}
        self.exited: AttemptReport | None = None

    def on_started(self, info: RunInfo) -> None:
        self.info["report"] = AttemptReport.of(info).to_wire()

    def on_exited(self, info: RunInfo) -> None:
        # With its phases (prepare, gate, work marks), as a local run records them.
        self.exited = AttemptReport.of(info)
        self.info["report"] = self.exited.to_wire()

    async def add_telemetry(self, sampling: AttemptSampling | None) -> None:
        """Once the run has exited: its report carries its GPUs' samples taken here."""
        if sampling is None or self.exited is None:
            return
        exited_at = self.exited.exited_at
        telemetry = await sampling.finish(exited_at.timestamp() if exited_at else None)
        self.info["report"] = self.exited.with_telemetry(telemetry).to_wire()


async def _run(
    runner: Runner,
    config: HashedConfig,
    gpus: tuple[str, ...],
    telemetry: NodeTelemetry | None = None,
) -> dict[str, Any]:
    """Run the attempt (its GPUs sampled meanwhile, with `telemetry`); its outcome as
    plain data. SIGTERM cancels it (cleanly)."""
    observer = _Observer()
    message: dict[str, Any] = {"kind": "cancelled"}
    async with anyio.create_task_group() as tg:

        async def stop_on_term() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    return

        async def attempt() -> None:
            nonlocal message
            sampling = AttemptSampling.start(telemetry, gpus)
            try:
                outcome = await runner.run(config, gpus=gpus, observer=observer)
            except Exception as exc:  # noqa: BLE001 - every error goes to the driver as data
                message = {"kind": "error", "error": error_payload(exc)}
                await observer.add_telemetry(sampling)
            else:
                if isinstance(outcome, ExperimentFailure):
                    message = {"kind": "failure", "failure": outcome.model_dump(mode="json")}
                else:
                    message = {"kind": "result", "result": outcome.model_dump(mode="json")}
                await observer.add_telemetry(sampling)
            finally:
                if sampling is not None:
                    sampling.stop()
                with anyio.move_on_after(30, shield=True):
                    await runner.aclose()
            tg.cancel_scope.cancel()

        tg.start_soon(stop_on_term)
        tg.start_soon(attempt)
    return {**message, "info": observer.info}


def gpu_state_dir() -> Path:
    """This node's record of when each GPU's last experiment ended its work (per user)."""
    default = Path(tempfile.gettempdir()) / f"llem-gpu-state-{os.getuid()}"
    return Path(os.environ.get("LLEM_GPU_STATE_DIR") or default)


def _gpu_keys(ids: tuple[str, ...], uuids: dict[str, str]) -> list[str]:
    """A file name per GPU: its UUID where NVML knows it, else its node-wide index
    (Slurm's SLURM_STEP_GPUS / SLURM_JOB_GPUS: a job confined to its GPUs may see
    each of them as 0), else its index here."""
    node_wide = os.environ.get("SLURM_STEP_GPUS") or os.environ.get("SLURM_JOB_GPUS") or ""
    indices = [g for g in node_wide.split(",") if g]
    if len(indices) != len(ids):
        indices = list(ids)
    keys = [uuids.get(i) or f"index-{n}" for i, n in zip(ids, indices, strict=True)]
    return [re.sub(r"[^A-Za-z0-9._-]", "_", key) for key in keys]


def last_work_ended(ids: tuple[str, ...], uuids: dict[str, str]) -> float | None:
    """When the last experiment on any of these GPUs ended its work (epoch s), if recorded."""
    ends = []
    for key in _gpu_keys(ids, uuids):
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            ends.append(float(json.loads((gpu_state_dir() / key).read_text())["work_ended"]))
    return max(ends, default=None)


def record_work_ended(ids: tuple[str, ...], uuids: dict[str, str], ended: float) -> None:
    """Note on this node that these GPUs' experiment ended its work at `ended` (epoch s)."""
    folder = gpu_state_dir()
    with contextlib.suppress(OSError):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for key in _gpu_keys(ids, uuids):
            write_json(folder / key, {"work_ended": ended, "job": os.environ.get("SLURM_JOB_ID")})


def _ended_at(message: Mapping[str, Any]) -> float:
    """The end of the attempt's work (its `done` mark), else its exit, else now."""
    report = (message.get("info") or {}).get("report") or {}
    for name in ("work_ended_at", "exited_at"):
        with contextlib.suppress(TypeError, ValueError):
            return datetime.fromisoformat(str(report[name])).timestamp()
    return time.time()


def _settle(
    spec: Mapping[str, Any], ids: tuple[str, ...], uuids: dict[str, str], virtual: bool
) -> None:
    """The cooldown, then the thermal gate, on this job's own GPUs, before the workload.

    Slurm, not we, chose the GPUs, and the job before ours on them may have just
    ended: the gap is kept here, where the GPUs are known, and counts from the end of
    that job's work (its `done` mark, recorded on this node), as on this host."""
    if not ids:
        return
    cooldown = float(spec.get("cooldown_s") or 0)
    if cooldown > 0:
        ended = last_work_ended(ids, uuids)
        # Unknown (the first on them, or the record is gone): the whole cooldown.
        wait = cooldown if ended is None else ended + cooldown - time.time()
        if wait > 0:
            time.sleep(min(wait, cooldown))
    if spec.get("settle") is not None and not virtual:
        gate = SettleSpec.model_validate(spec["settle"])
        settle_after_exit(ids, uuids, gate, time.monotonic())


def main(argv: list[str] | None = None) -> int:
    """Run the attempt described in the attempt dir given as the one argument."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m llem_dispatch.slurm.job ATTEMPT_DIR", file=sys.stderr)
        return 2
    folder = Path(args[0])
    spec = json.loads((folder / SPEC_FILE).read_text())
    ids, uuids, virtual = _gpus()
    started: dict[str, Any] = {
        "node": socket.gethostname(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "step_id": os.environ.get("SLURM_STEP_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_ids": list(ids),
        "gpu_uuids": [uuids[i] for i in ids if i in uuids],
        "pid": os.getpid(),
    }
    try:
        _settle(spec, ids, uuids, virtual)
        started["gpus_at_start"] = [] if virtual else gpus_at_start(ids, uuids)
        started["started_at"] = time.time()
        write_json(folder / STARTED_FILE, started)
        with Path(spec["factory"]).open("rb") as fh:
            # Our own file, written by the driver into the study's results dir.
            factory = pickle.load(fh)  # noqa: S301
        host = JobHost(virtual=virtual, driver_host=started["node"] == spec.get("driver_host"))
        runner = factory(host)
        config = HashedConfig(spec["config"], spec["config_hash"])
        # Handed over by UUID where NVML knows it: never a guessable index.
        telemetry = NodeTelemetry.from_wire(spec.get("telemetry"))
        gpus = tuple(uuids.get(i, i) for i in ids)
        message = anyio.run(_run, runner, config, gpus, telemetry)
        record_work_ended(ids, uuids, _ended_at(message))
    except Exception as exc:  # noqa: BLE001 - the driver gets every failure as data
        message = {"kind": "error", "error": error_payload(exc), "info": {}}
    message["node"] = started["node"]
    write_json(folder / OUTCOME_FILE, message)
    # The state Slurm records says it too: COMPLETED only for a result.
    return {"result": 0, "cancelled": 143}.get(message["kind"], 1)


if __name__ == "__main__":
    sys.exit(main())
