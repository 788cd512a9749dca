"""The study file's schema: what a user may write, each field documented and checked.

Its sections are in `sections`, the runner value's grammar in `runner_value`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails

from llem_dispatch._cdi import check_kind
from llem_dispatch._deadlines import ApiDeadlines
from llem_dispatch.dispatch.registry import (
    placement_names,
    placement_settings_model,
)
from llem_dispatch.errors import ConfigError
from llem_dispatch.gpu import SettleSpec
from llem_dispatch.study.host import HostSchedule
from llem_dispatch.study.placement_block import chosen_placement, placement_block, raised_again
from llem_dispatch.study.runner_value import (
    RunnerSpec,
    check_image,
    check_image_for,
    parse_runner_value,
)
from llem_dispatch.study.sections import (
    BuildSpec,
    CycleSpec,
    ReportSpec,
    TelemetrySpec,
    UntilSpec,
    problems,
)

__all__ = [
    "BuildSpec",
    "CycleSpec",
    "Experiment",
    "ReportSpec",
    "RunnerSpec",
    "Study",
    "TelemetrySpec",
    "UntilSpec",
    "check_image",
    "interpolate",
    "parse_runner_value",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _check_gpu_count(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"{where} is {value!r}: the number of GPUs must be a whole number >= 0 "
            "(it is read through `gpus_field`)"
        )


def interpolate(value: str) -> str:
    """`${VAR}` / `${VAR:-default}` from the environment (for build args)."""
    return _ENV_REF.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


class Study(HostSchedule):
    """A sweep: what to run, over which parameters, on which runner and GPUs.

    Every field is documented by its `description` (the README's study-file
    example says the same; a unit test keeps the two in step).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        default="study",
        description="Names the results dir (./llem-results/<name>): letters, digits, '.', "
        "'_' and '-', starting with a letter or digit.",
    )
    runner: str | None = Field(
        default=None,
        description="A runner kind (local | docker | docker:IMAGE | a registered kind) or auto; "
        "--runner and LLEM_RUNNER override it (default auto: Docker if the study has an image "
        "and a daemon answers, else local).",
    )
    cluster: str | None = Field(
        default=None,
        description="Run on a Ray cluster: its address (auto | HOST:6379 | ray://HOST:10001); "
        "short for `placement: ray` with `ray: {address: ...}`.",
    )
    placement: str = Field(
        default="",
        validate_default=True,
        description="Where experiments run: local (this host's GPUs, the default) | ray (a Ray "
        "cluster, set in `ray:`) | slurm (Slurm jobs, set in `slurm:`) | a registered one; "
        "its settings go in a block named after it, checked by the placement's own model "
        "(`ray: {address: ...}`); `cluster: ADDRESS` implies ray.",
    )
    image: str | None = Field(default=None, description="The image every experiment runs in.")
    images: dict[str, str] = Field(
        default_factory=dict,
        description="Per-backend images ({pytorch: img-a:1, vllm: img-b:2}), chosen by each "
        "config's `image_field`; LLEM_IMAGE_<BACKEND> overrides one.",
    )
    image_field: str = Field(
        default="backend", description="The config field whose value picks from `images:`."
    )
    gpus_field: str | None = Field(
        default=None,
        description="A config field that says how many GPUs each experiment gets (an 8B "
        "model on 1, a 70B on 4); configs without it get `gpus_per_experiment`.",
    )
    build: BuildSpec | None = Field(
        default=None, description="Optional: build the image if it is missing."
    )
    command: list[str] | None = Field(
        default=None, description="argv each experiment runs (instead of `function:`)."
    )
    function: str | None = Field(
        default=None,
        description="module:function run by the mounted helper (or `command: [argv]`).",
    )
    mount_study_dir: bool = Field(
        default=False,
        description="Development runs: mount the study's folder read-only in each container "
        "and put it on PYTHONPATH, so a `function:` module beside the study file is found "
        "without rebuilding the image (for measurements, COPY it into the image instead).",
    )
    workdir: str | None = Field(
        default=None, description="Local runner's cwd (default: the study's folder)."
    )
    base: dict[str, Any] = Field(
        default_factory=dict, description="Parameters shared by every experiment."
    )
    configs: list[dict[str, Any]] = Field(
        default_factory=list, description="An explicit list of configs (and/or `grid:`)."
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Cartesian product: every combination of these values is one config.",
    )
    gpus_per_experiment: int = Field(
        default=0, ge=0, description="GPUs each experiment gets, pinned and exclusive."
    )
    settle: SettleSpec | None = Field(
        default=None,
        description="Thermal gate per GPU, next to `experiment_gap_s`: {temperature_c: 3, "
        "power_w: 10, min_s: 5, max_s: 120}; real GPUs only (ignored on virtual ones).",
    )
    residual_memory_mb: float | None = Field(
        default=512,
        ge=0,
        description="Hold back a real GPU while more than this much of its memory is in use "
        "(a previous run's leftovers spoil the next measurement); null turns it off. "
        "Ignored on virtual GPUs.",
    )
    n_cycles: int | CycleSpec = Field(
        default=1,
        description="Repeat every config this many times, or adaptively: {min: 3, max: 12, "
        "until: {field: F, rel_ci95: 0.05}} adds cycles to a config until the 95% CI of "
        "its result field F is within 5% of the mean, or it reaches max.",
    )
    cycle_order: Literal["sequential", "interleaved", "shuffled"] = Field(
        default="sequential",
        description="sequential | interleaved | shuffled (with `seed:` recorded).",
    )
    seed: int | None = Field(
        default=None,
        description="Seed of the shuffled order; drawn and recorded when not given.",
    )
    experiment_gap_s: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="Per-GPU cooldown between experiments (thermal settling), seconds: "
        "from the end of the previous one's work (its `done` mark), else from its exit; "
        "the GPUs are handed on no earlier than the exit.",
    )
    cycle_gap_s: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="Pause between cycles, seconds."
    )
    timeout_s: float | None = Field(
        default=None,
        description="Kill and raise ExperimentTimeoutError (DockerTimeoutError from the "
        "docker runner) after this many seconds "
        "(from the gate, for a prestarted run); finite and > 0, or null for no limit.",
    )
    silence_timeout_s: float | None = Field(
        default=None,
        description="Kill with ExperimentHangError (DockerHangError from the docker runner) "
        "after this many seconds without output; "
        "finite and > 0, or null for no limit.",
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Cap on simultaneous experiments (default: what the GPUs allow).",
    )
    gpu_ids: list[str] | Literal["auto"] | None = Field(
        default=None,
        alias="gpus",
        description="`gpus:` in the file: GPU ids of this host to schedule on ([0, 1]) or "
        "`auto` (NVML; also the default).",
    )
    virtual_gpus: int | None = Field(
        default=None,
        ge=1,
        description="Schedule on this many virtual ids (CI, laptops): no device requests.",
    )
    gpu_passthrough: bool | None = Field(
        default=None,
        description="Hand the assigned GPUs to containers (default: unless they are virtual).",
    )
    gpu_devices: Literal["auto", "cdi", "nvidia"] = Field(
        default="auto",
        description="How a container engine is asked for the GPUs: `cdi` names each by "
        "UUID (`<cdi_kind>=<UUID>`, Container Device Interface; refused before anything "
        "runs when the engine or its specs cannot), `nvidia` uses NVIDIA device requests, "
        "`auto` takes CDI when the engine has it and a spec names every GPU. Records say "
        "which (`gpu_request`).",
    )
    cdi_kind: str = Field(
        default="nvidia.com/gpu",
        description="The CDI kind (vendor/class) whose specs name the GPUs by UUID "
        "(NVIDIA's toolkit: nvidia.com/gpu).",
    )
    retries: int = Field(
        default=3, ge=0, description="Retries for transient infrastructure errors only."
    )
    stop_grace_s: float = Field(
        default=10.0,
        ge=0,
        allow_inf_nan=False,
        description="On interrupt: SIGTERM, then SIGKILL after this.",
    )
    shm_size: str = Field(default="8g", description="/dev/shm (default 8g, as vLLM needs).")
    network: str | None = Field(
        default=None,
        description='Docker network mode ("none": isolated and faster to start).',
    )
    user: str | None = Field(
        default=None,
        description='"uid:gid" to run as (all capabilities dropped either way).',
    )
    cap_add: list[str] = Field(
        default_factory=list, description="Capabilities to keep (all others are dropped)."
    )
    mem_limit: str | None = Field(default=None, description='Container memory limit ("16g").')
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment (never secrets: see the README)."
    )
    docker_deadlines: dict[str, float] = Field(
        default_factory=dict,
        description="Seconds each Docker API call may take before the daemon counts as hung "
        "(create, attach, start, inspect, kill, stop, delete, image, list, logs, "
        "liveness_every); the defaults suit a slow but healthy daemon.",
    )
    max_experiments: int = Field(
        default=1_000_000,
        ge=1,
        description="Refuse a study that expands to more experiments than this (a grid "
        "typo can mean billions); raise it if you mean it.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra Docker labels on every container."
    )
    measure: dict[str, str] = Field(
        default_factory=dict,
        description="The result's own measurement window and figure, for independent "
        "energy from telemetry: {start: t_start, end: t_end, energy: total_energy_j} (result "
        "fields; start/end in epoch seconds, energy in joules).",
    )
    telemetry: TelemetrySpec = Field(
        default_factory=TelemetrySpec,
        description="GPU telemetry: {enabled: null (auto), interval_s: 0.1}; samples go to "
        "telemetry.csv.gz in the results dir, energy per experiment into its record.",
    )
    report: ReportSpec | None = Field(
        default=None,
        description="What `llem-dispatch results` and `report` show first: `columns` (result "
        "fields), `x` and `group` (parameters the plots use).",
    )

    @field_validator("n_cycles", mode="before")
    @classmethod
    def _cycles_ok(cls, value: Any) -> Any:
        """A whole number >= 1, or the adaptive form; each problem named by its sub-field."""
        if isinstance(value, Mapping):
            try:
                return CycleSpec.model_validate(value)
            except ValidationError as exc:
                raise ValueError(problems("n_cycles", exc)) from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{value!r}: give a whole number of cycles >= 1, or "
                "{min: 3, max: 12, until: {field: F, rel_ci95: 0.05}}"
            )
        return value

    @field_validator("measure")
    @classmethod
    def _measure_ok(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - {"start", "end", "energy"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}: known are start, end, energy")
        if value and not {"start", "end"} <= set(value):
            raise ValueError("give both `start` and `end` (result fields, epoch seconds)")
        return {k: v.removeprefix("result.") for k, v in value.items()}

    @field_validator("cdi_kind")
    @classmethod
    def _cdi_kind_form(cls, value: str) -> str:
        return check_kind(value)

    @field_validator("image")
    @classmethod
    def _image_ok(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The kind that runs it checks the reference: a registry name, or a .sif file.
        return check_image_for(info.data.get("runner"), value) if value is not None else None

    @field_validator("images")
    @classmethod
    def _images_ok(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for image in value.values():
            check_image_for(info.data.get("runner"), image)
        return value

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        # The name becomes a directory: never a path, never '.', '..' or empty.
        if not _NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a safe directory name: use 1-100 letters, digits, '.', "
                "'_' or '-', starting with a letter or digit (e.g. 'llama-sweep-1')"
            )
        return value

    @field_validator("docker_deadlines")
    @classmethod
    def _deadlines_ok(cls, value: dict[str, float]) -> dict[str, float]:
        known = ApiDeadlines.__slots__
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown Docker call(s) {unknown}: known are {', '.join(known)}")
        ApiDeadlines(**value)  # positive and finite, or a ValueError naming the call
        return value

    @field_validator("function")
    @classmethod
    def _function_ok(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[\w.]+:[\w.]+$", value):
            raise ValueError(f"{value!r} must look like 'package.module:function'")
        return value

    @field_validator("runner")
    @classmethod
    def _runner_ok(cls, value: str | None) -> str | None:
        if value is not None:
            parse_runner_value(value)
        return value

    @field_validator("grid")
    @classmethod
    def _grid_ok(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, options in value.items():
            if not options:
                raise ValueError(f"grid.{key} is an empty list: give at least one value")
        return value

    @field_validator("base", "configs", "grid")
    @classmethod
    def _gpu_counts_ok(cls, value: Any, info: ValidationInfo) -> Any:
        """Every per-config GPU count (`gpus_field`), checked here once, at load."""
        field = info.data.get("gpus_field")
        if not field:
            return value
        if info.field_name == "grid":
            counts = [(f"grid.{field}[{i}]", n) for i, n in enumerate(value.get(field, []))]
        elif info.field_name == "configs":
            counts = [
                (f"configs[{i}].{field}", c[field]) for i, c in enumerate(value) if field in c
            ]
        else:
            counts = [(f"base.{field}", value[field])] if field in value else []
        for where, count in counts:
            _check_gpu_count(count, where)
        return value

    @field_validator("gpu_ids", mode="before")
    @classmethod
    def _gpu_ids_as_text(cls, value: Any) -> Any:
        """`gpus: [0, 1]` names devices 0 and 1: ids are text (indices or UUIDs)."""
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("timeout_s", "silence_timeout_s")
    @classmethod
    def _limit_ok(cls, value: float | None, info: ValidationInfo) -> float | None:
        """A time limit is finite and > 0 (null: none); the runners take it as it is."""
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"must be a finite number of seconds > 0, got {value!r}: "
                f"give the longest an experiment may take (e.g. {info.field_name}: 3600), "
                "or leave it out for no limit"
            )
        return value

    @field_validator("placement")
    @classmethod
    def _placement_ok(cls, value: str, info: ValidationInfo) -> str:
        """A registered placement; `cluster: ADDRESS` is the Ray form (placement inferred)."""
        return chosen_placement(value, info.data.get("cluster"))

    #: The settings block of the study's placement, validated by its own model (None:
    #: the placement takes no settings). Set once, by `_with_placement_block`.
    _placement_settings: BaseModel | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _with_placement_block(cls, data: Any, handler: ModelWrapValidatorHandler[Study]) -> Study:
        """The block named after the study's placement (`ray: {...}`), validated by the
        model that placement declares; every problem at its key, with the rest's."""
        if not isinstance(data, Mapping):
            return handler(data)
        names = set(placement_names()) - cls.model_fields.keys() - {"gpus"}
        blocks = {key: value for key, value in data.items() if key in names}
        errors: list[InitErrorDetails] = []
        study: Study | None = None
        try:
            study = handler({k: v for k, v in data.items() if k not in blocks})
        except ValidationError as exc:
            errors += [raised_again(e) for e in exc.errors()]
        try:
            placement = chosen_placement(data.get("placement") or "", data.get("cluster"))
        except ValueError:
            placement = None  # said once, at `placement:`
        settings: BaseModel | None = None
        if placement is not None:
            settings = placement_block(placement, blocks, data.get("cluster"), errors)
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        assert study is not None
        study._placement_settings = settings
        return study

    @model_serializer(mode="wrap")
    def _dump_with_block(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        """The placement's block under its name, as the study file gives it."""
        data: dict[str, Any] = handler(self)
        excluded = info.exclude if isinstance(info.exclude, Mapping | set) else ()
        block = self._placement_settings
        if block is not None and self.placement not in excluded:
            data[self.placement] = block.model_dump(mode=info.mode)
        return data

    def on_placement(self, name: str, settings: Mapping[str, Any] | None = None) -> Study:
        """This study on placement `name`, `settings` over its block; validated again.

        How `--ray ADDRESS` and `run_study(cluster=...)` override the study file.
        """
        if settings and placement_settings_model(name) is None:
            raise ConfigError(
                f"placement {name!r} takes no settings, but {dict(settings)} were given",
                fix_suggestion="Drop them, or choose a placement they belong to.",
            )
        data = self.model_dump(by_alias=True, exclude={"cluster", "placement", self.placement})
        data["placement"] = name
        current = self._placement_settings if name == self.placement else None
        if current is not None or settings:
            data[name] = {**(current.model_dump() if current else {}), **(settings or {})}
        try:
            return Study.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise ConfigError(
                f"placement {name!r} with {dict(settings or {})}: {problems}",
                fix_suggestion="Correct the placement's settings; nothing was run.",
            ) from exc

    def placement_settings(self) -> BaseModel | None:
        """The settings block of the study's placement (`ray: {...}`), typed by the model
        that placement declares (its defaults when the file gives none); None when the
        placement takes no settings."""
        return self._placement_settings

    @classmethod
    def file_keys(cls) -> list[str]:
        """Every top-level key a study file may use: its fields (by the file's names),
        and the settings block of each registered placement."""
        fields = {field.alias or name for name, field in cls.model_fields.items()}
        return sorted(fields | set(placement_names()))

    def planned_experiments(self) -> int:
        """How many (config, cycle) runs the study asks for, counted without expanding it."""
        configs = len(self.configs) + (
            math.prod(len(v) for v in self.grid.values()) if self.grid else 0
        )
        return max(configs, 1 if self.base else 0) * self.max_cycles

    @property
    def adaptive(self) -> CycleSpec | None:
        """The adaptive form of `n_cycles`, or None for a fixed number."""
        return self.n_cycles if isinstance(self.n_cycles, CycleSpec) else None

    @property
    def min_cycles(self) -> int:
        """Cycles every config gets."""
        return self.n_cycles.min if isinstance(self.n_cycles, CycleSpec) else self.n_cycles

    @property
    def max_cycles(self) -> int:
        """Cycles no config goes beyond."""
        return self.n_cycles.max if isinstance(self.n_cycles, CycleSpec) else self.n_cycles

    @model_validator(mode="after")
    def _consistent(self) -> Study:
        if not self.configs and not self.grid and not self.base:
            raise ValueError("the study has no experiments: give `configs:` or `grid:`")
        if self.command is not None and self.function is not None:
            raise ValueError("give either `command:` or `function:`, not both")
        if self.gpu_ids is not None and self.virtual_gpus is not None:
            raise ValueError("give either `gpus:` or `virtual_gpus:`, not both")
        planned = self.planned_experiments()
        if planned > self.max_experiments:
            sizes = " x ".join(str(len(v)) for v in self.grid.values()) or "0"
            raise ValueError(
                f"the study expands to {planned:,} experiments (grid {sizes}, "
                f"{len(self.configs)} configs, {self.max_cycles} cycle(s) at most), over "
                f"max_experiments={self.max_experiments:,}: shrink the grid, or raise "
                "max_experiments"
            )
        return self

    @field_validator("report")
    @classmethod
    def _report_ok(cls, value: ReportSpec | None, info: ValidationInfo) -> ReportSpec | None:
        if value is None:
            return None
        # Parameters are known before anything runs; result fields only after.
        params = {"cycle", *info.data.get("base", {})}
        params.update(info.data.get("grid", {}))
        for config in info.data.get("configs", []):
            params.update(config)
        for name in ("x", "group"):
            chosen = getattr(value, name)
            if chosen is not None and chosen not in params:
                close = difflib.get_close_matches(chosen, sorted(params), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(
                    f"report.{name} {chosen!r} is not a parameter of the study; {hint}"
                    f"(parameters: {', '.join(sorted(params))})"
                )
        if value.x is not None and value.x == value.group:
            raise ValueError(f"report.x and report.group are both {value.x!r}: pick two")
        return value


@dataclass(frozen=True, slots=True)
class Experiment:
    """One run of one config in one cycle."""

    config: dict[str, Any]
    config_hash: str
    cycle: int
    #: How many GPUs it runs on (validated at load: a whole number >= 0).
    gpu_count: int

    @property
    def key(self) -> str:
        return f"{self.config_hash}_c{self.cycle}"
