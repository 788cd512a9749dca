"""A results dir read for people: its study, records and journal, flattened into rows.

Pure Python (no pandas, no plotly): the `results` table, `load_results` and the HTML
report all start here, so they agree on what each column is called and holds.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import yaml

from llem_dispatch.dispatch import NodeInfo
from llem_dispatch.errors import ConfigError
from llem_dispatch.study import ReportSpec, iter_records

__all__ = [
    "EXTRA_OF",
    "PARAM",
    "RESULT",
    "StudyResults",
    "failure_info",
    "flat_row",
    "format_duration",
    "format_param",
    "format_value",
    "read_results",
    "require_extra",
    "short_keys",
    "sort_records",
    "window_disturbed",
]

PARAM, RESULT = "param.", "result."
#: What a record says about its neighbours during its measured window (optional:
#: results written before the isolation policy existed carry none of them).
WINDOW_FIELDS = (
    "isolation",
    "window_prepare_overlap_s",
    "window_work_overlap_s",
    "neighbours_paused_s",
)
#: The fix shown for an experiment that reported its own failure (nothing to retry).
SELF_REPORTED_FIX = "The experiment reported this itself; see its traceback in the record."


#: The extra that brings each optional package (pyproject.toml's optional-dependencies):
#: the report needs plotly alone; `load_results` and Parquet need pandas and pyarrow.
#: `analysis` is both.
EXTRA_OF: Mapping[str, str] = MappingProxyType(
    {"plotly": "report", "pandas": "data", "pyarrow": "data"}
)


def require_extra(module: str, purpose: str) -> ModuleType:
    """Import an optional package (`EXTRA_OF`), or say which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.partition(".")[0]
        extra = EXTRA_OF.get(package, "analysis")
        raise ModuleNotFoundError(
            f"{purpose} needs {package}, which comes with the `{extra}` extra: "
            f"pip install 'llem-dispatch[{extra}]' (`analysis` brings report and data)",
            name=package,
        ) from exc


@dataclass(frozen=True)
class StudyResults:
    """Everything a results dir holds about a study, as plain data."""

    path: Path
    study: dict[str, Any]
    facts: dict[str, Any]
    records: list[dict[str, Any]]
    journal: list[dict[str, Any]]

    @property
    def name(self) -> str:
        """The study's name (the results dir's name when study.json is missing)."""
        return str(self.study.get("name") or self.path.name)

    @property
    def report(self) -> ReportSpec:
        """The study's `report:` section (empty when it has none)."""
        return ReportSpec.model_validate(self.study.get("report") or {})

    @property
    def gpu_count(self) -> int | None:
        """GPUs the study ran on: the pool's ids, or a cluster's total; None if unknown."""
        if isinstance(self.facts.get("gpus"), list):
            return len(self.facts["gpus"])
        if isinstance(self.facts.get("cluster_gpus"), dict):
            return int(sum(self.facts["cluster_gpus"].values()))
        return None

    def param_order(self) -> list[str]:
        """Parameter names in the order the study file gives them (grid, configs, base)."""
        names: dict[str, None] = dict.fromkeys(self.study.get("grid") or {})
        for config in self.study.get("configs") or []:
            names.update(dict.fromkeys(config))
        names.update(dict.fromkeys(self.study.get("base") or {}))
        for record in self.records:
            names.update(dict.fromkeys(record.get("config") or {}))
        return list(names)


def read_results(results_dir: str | Path) -> StudyResults:
    """Read a results dir written by `run`; `ConfigError` if it is not one."""
    path = Path(results_dir)
    if not (path / "records").is_dir():
        raise ConfigError(
            f"{path} holds no records/ folder: it is not a results dir",
            fix_suggestion="Point at a dir written by `llem-dispatch run` (its --results).",
        )
    facts: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        facts = json.loads((path / "study.json").read_text())
    study = facts.pop("study", None) or {}
    with contextlib.suppress(OSError, yaml.YAMLError):
        # study.yaml keeps the user's key order (study.json is sorted).
        ordered = yaml.safe_load((path / "study.yaml").read_text())
        if isinstance(ordered, dict):
            study = ordered
    return StudyResults(path, study, facts, list(iter_records(path)), _read_journal(path))


def _read_journal(path: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        for line in (path / "journal.jsonl").read_text().splitlines():
            # A torn last line (power loss mid-write) is skipped, not fatal.
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and "event" in event:
                    events.append(event)
    return events


def _flatten(prefix: str, data: Mapping[str, Any], out: dict[str, Any], lists: bool) -> None:
    """Nested result dicts become dotted columns; lists are kept only when asked."""
    for key, value in sorted(data.items()):
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(f"{name}.", value, out, lists)
        elif isinstance(value, list | tuple):
            if lists:
                out[name] = list(value)
        else:
            out[name] = value


def _duration(start: Any, end: Any) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def flat_row(data: Mapping[str, Any], *, lists: bool = False) -> dict[str, Any]:
    """One flat row per record: params, status, timing, GPUs, result fields, error.

    Config values that are dicts or lists are JSON text (hashable, one column per
    parameter); nested result dicts become `result.a.b`; GPU telemetry's energy is
    `energy.run_j` (start to exit) and, for a study with `measure:`, `energy.window_j`,
    `energy.reported_j`, `energy.ratio` (ours / reported), `energy.window_s`,
    `energy.window_short`; what shared the host while it measured is `cpus` (the cores
    it was pinned to), `isolation`, the neighbour-seconds `window_prepare_overlap_s`,
    `window_work_overlap_s`, `neighbours_paused_s`, and `window_disturbed` (None where
    the record does not say); result lists, and `gpu_ids` and `cpus` as lists rather
    than "0,3", only with `lists=True` (for pandas).
    """
    row: dict[str, Any] = {
        "key": data.get("key"),
        "config_hash": data.get("config_hash"),
        "cycle": data.get("cycle"),
        "status": data.get("status"),
    }
    for k, v in sorted((data.get("config") or {}).items()):
        row[f"{PARAM}{k}"] = json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v
    duration = _duration(data.get("started_at"), data.get("ended_at"))
    row["duration_s"] = round(duration, 3) if duration is not None else None
    for stamp in ("queued_at", "started_at", "exited_at", "ended_at"):
        row[stamp] = data.get(stamp)
    if node := data.get("node"):
        # Cluster runs: GPU ids are per node, so the node goes beside them.
        row["node"] = NodeInfo.model_validate(node).label
    gpu_ids = [str(g) for g in data.get("gpu_ids") or []]
    row["gpu_ids"] = gpu_ids if lists else ",".join(gpu_ids)
    for field in ("runner_type", "engine", "image", "image_digest", "attempts", "handoff_gap_s"):
        row[field] = data.get(field)
    # Where the GPU's idle gap went (prepare, gate, first measured work).
    for field in ("prestarted", "prepare_s", "gate_wait_s", "gate_to_work_s", "prestart_held"):
        row[field] = data.get(field)
    for field in ("work_started_at", "work_ended_at"):  # the `work` and `done` marks
        row[field] = data.get(field)
    # What shared the host while it measured: its cores, and what its neighbours did.
    cpus = [str(c) for c in data.get("cpus") or []]
    row["cpus"] = cpus if lists else ",".join(cpus)
    for field in WINDOW_FIELDS:
        row[field] = data.get(field)
    row["window_disturbed"] = window_disturbed(data)
    result = data.get("result") or {}
    payload = result.get("data", result) if isinstance(result, dict) else {}
    if isinstance(payload, Mapping):
        _flatten(RESULT, payload, row, lists)
    row.update(_energy_columns(data.get("telemetry")))
    kind, message, fix = failure_info(data)
    row["error"], row["error_message"], row["fix"] = kind, message, fix
    row["exchange_dir"] = data.get("exchange_dir")
    return row


def _energy_columns(telemetry: Any) -> dict[str, Any]:
    """The dispatcher's own energy figures (GPU telemetry), summed over the run's GPUs."""
    if not isinstance(telemetry, Mapping):
        return {}
    out: dict[str, Any] = {}
    run = telemetry.get("run")
    if isinstance(run, Mapping):
        out["energy.run_j"] = run.get("energy_j")
    window = telemetry.get("window")
    if isinstance(window, Mapping) and "energy_j" in window:
        out["energy.window_j"] = window.get("energy_j")
        out["energy.reported_j"] = window.get("reported_j")
        out["energy.ratio"] = window.get("ratio")
        out["energy.window_s"] = window.get("duration_s")
        out["energy.window_short"] = window.get("short")
    return out


def window_disturbed(record: Mapping[str, Any]) -> bool | None:
    """Whether the run's measured window overlapped unpaused preparation of a neighbour.

    The record's `window_disturbed`; where only the overlap was recorded, a positive
    `window_prepare_overlap_s`. None when the record does not say (older results).
    """
    flag = record.get("window_disturbed")
    if isinstance(flag, bool):
        return flag
    overlap = record.get("window_prepare_overlap_s")
    if isinstance(overlap, int | float) and not isinstance(overlap, bool):
        return overlap > 0
    return None


def failure_info(record: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(error class, message, fix suggestion) of a record; all None for a success."""
    if error := record.get("error"):
        return error.get("type"), error.get("message"), error.get("fix_suggestion")
    if failure := record.get("failure"):
        return failure.get("type"), failure.get("message"), SELF_REPORTED_FIX
    if record.get("status") not in (None, "succeeded"):
        return record.get("status"), None, None
    return None, None, None


def _order_key(value: Any) -> tuple[int, Any]:
    """Numbers numerically, then text, then anything else, then missing."""
    if isinstance(value, bool):
        return (1, str(value))
    if isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value)):
        return (0, value)
    if isinstance(value, str):
        return (1, value)
    if value is None:
        return (3, "")
    return (2, json.dumps(value, sort_keys=True, default=str))


def sort_records(
    records: Iterable[Mapping[str, Any]], params: list[str]
) -> list[Mapping[str, Any]]:
    """Records ordered by their parameters (in study order), then cycle: as a person scans."""

    def key(record: Mapping[str, Any]) -> tuple[Any, ...]:
        config = record.get("config") or {}
        return (
            *(_order_key(config.get(p)) for p in params),
            _order_key(record.get("cycle")),
            str(record.get("key")),
        )

    return sorted(records, key=key)


def short_keys(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Key -> the shortest unique hash prefix (7+ hex), with `_cN` only when cycles vary."""
    items = [(str(r.get("key")), str(r.get("config_hash") or r.get("key"))) for r in records]
    hashes = {h for _, h in items}
    cycles = {k.rpartition("_c")[2] for k, _ in items}
    width = 7
    while width < 16 and len({h[:width] for h in hashes}) < len(hashes):
        width += 1
    return {
        key: h[:width] + (f"_c{key.rpartition('_c')[2]}" if len(cycles) > 1 else "")
        for key, h in items
    }


def format_value(value: Any) -> str:
    """A cell for people: floats to 4 significant digits, big numbers grouped, None empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 100_000 else str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        if abs(value) >= 1e9:
            return f"{value:.4g}"
        if abs(value) >= 10_000:
            return f"{value:,.0f}"
        if abs(value) < 1e-3:
            return f"{value:.3g}"
        # Trailing zeros kept: a column of 4-digit numbers lines up (46.70 over 125.6).
        return f"{value:#.4g}".rstrip(".")
    if isinstance(value, list | dict):
        return json.dumps(value, default=str)
    return str(value)


def format_param(value: Any) -> str:
    """A parameter as the study file wrote it (0.8, not 0.8000; true, not yes)."""
    if value is None:
        return ""
    if isinstance(value, bool | list | dict):
        return json.dumps(value, default=str)
    return str(value)


def format_duration(seconds: float | None) -> str:
    """0.45s, 12.3s, 4m05s, 2h03m."""
    if seconds is None:
        return ""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
