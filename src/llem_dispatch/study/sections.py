"""The study file's sections: build, report, adaptive cycles, telemetry.

Each a pydantic model of its own, checked where the study is loaded (`schema.Study`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from llem_dispatch._sizes import parse_size

__all__ = [
    "BuildSpec",
    "CycleSpec",
    "ReportSpec",
    "SizeText",
    "TelemetrySpec",
    "UntilSpec",
    "problems",
]


def _size_ok(value: str) -> str:
    parse_size(value)  # its ValueError says what a size looks like
    return value


#: A size as `shm_size` takes it ("32g", "512m", bytes), checked where it is written.
SizeText = Annotated[str, AfterValidator(_size_ok)]


class BuildSpec(BaseModel):
    """How to build the study's image when it is missing (like docker compose's `build:`)."""

    model_config = ConfigDict(extra="forbid")

    context: str = Field(
        description="Build context, relative to the study file (like docker compose)."
    )
    dockerfile: str | None = Field(
        default=None, description="Dockerfile, relative to the context (default: its Dockerfile)."
    )
    args: dict[str, str] = Field(
        default_factory=dict, description="Build args; `${VAR:-default}` reads the env."
    )


class UntilSpec(BaseModel):
    """When a config has had enough cycles: its result field's 95% CI is narrow enough."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(
        min_length=1,
        description="The result field judged (dotted for a nested one: `energy.gpu_j`).",
    )
    rel_ci95: float = Field(
        gt=0,
        allow_inf_nan=False,
        description="Stop once the 95% CI half-width is at most this share of |mean| "
        "(0.05: within 5%).",
    )

    @field_validator("field")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # Accept the column name `results` shows (`result.x`) for the field `x`.
        return value.removeprefix("result.")


class CycleSpec(BaseModel):
    """Adaptive repetition: `min` cycles each, then more until `until` holds or `max`."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(ge=2, description="Cycles every config gets (2 or more: a CI needs two).")
    max: int = Field(ge=2, description="Cycles no config goes beyond.")
    until: UntilSpec = Field(description="When a config needs no more cycles.")

    @model_validator(mode="after")
    def _ordered(self) -> CycleSpec:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class TelemetrySpec(BaseModel):
    """GPU telemetry sampled by the dispatcher (NVML), beside what the workload measures."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(
        default=None,
        description="Sample (default: on for real GPUs with NVML, off on virtual ones).",
    )
    interval_s: float = Field(
        default=0.1,
        ge=0.01,
        le=60,
        allow_inf_nan=False,
        description="Seconds between samples of energy and power (NVML's counter and "
        "power change every 100 ms: faster only costs CPU).",
    )
    detail_interval_s: float | None = Field(
        default=None,
        ge=0.01,
        le=600,
        allow_inf_nan=False,
        description="Seconds between reads of temperature, SM utilisation, memory and SM "
        "clock (one NVML call each per GPU; energy and power share one); default: every "
        "sample (on an H200 they added no measurable CPU: the energy counter's 4 ms is it).",
    )


class ReportSpec(BaseModel):
    """What `results` and `report` show first: which result fields, plotted against what."""

    model_config = ConfigDict(extra="forbid")

    columns: list[str] = Field(
        default_factory=list,
        description="Result fields shown in the `results` table and plotted in the report, "
        "in this order (default: the first few numeric ones).",
    )
    x: str | None = Field(
        default=None,
        description="The parameter on the plots' x axis (default: the varying numeric "
        "parameter with the most values).",
    )
    group: str | None = Field(
        default=None,
        description="The parameter whose values get one line each (default: every other "
        "varying parameter).",
    )


def problems(prefix: str, exc: ValidationError) -> str:
    """A nested model's errors as one line, each named by its dotted field."""
    return "; ".join(
        f"{'.'.join([prefix, *(str(p) for p in e['loc'])])}: "
        f"{e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )
