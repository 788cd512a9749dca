"""The thermal gate: hand a GPU on once it has settled, not after a fixed gap.

After an experiment exits, its GPU is handed on when its temperature and power
have been back within a tolerance of that GPU's idle baseline for `hold_s`
seconds, no sooner than `min_s` and no later than `max_s` (then it is handed on
anyway, and the lease says it had not settled). The pool reads a `Sensor` (off
the event loop) only while someone waits for GPUs, and only GPUs that could be
handed out, so the cost is about one NVML read per such GPU every `sample_s`.
`SettleTracker` holds the rule on plain values; `ThermalGate` adds a sensor it
calls itself, for callers that may block (a Ray task holding its GPUs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Sensor",
    "SettleReport",
    "SettleSpec",
    "SettleTracker",
    "ThermalGate",
    "read_sensor",
]

log = structlog.get_logger("llem_dispatch.gpu")


class Sensor(Protocol):
    """Reads one GPU's (temperature in C, power in W), or None when it cannot."""

    def __call__(self, device_id: str, /) -> tuple[float, float] | None: ...


class SettleSpec(BaseModel):
    """When a released GPU counts as settled (see the module docstring).

    The one settle model: the study file's `settle:` block is this model, the
    local pool and each Ray task take it as it is. Every limit is checked here,
    once: finite, and `max_s >= min_s`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    temperature_c: float = Field(
        default=3.0, ge=0, description="Settled: within this many C of the GPU's idle baseline."
    )
    power_w: float = Field(
        default=10.0, ge=0, description="Settled: within this many W of the idle baseline."
    )
    hold_s: float = Field(default=3.0, ge=0, description="...for at least this long.")
    min_s: float = Field(default=5.0, ge=0, description="Never hand a GPU on sooner than this.")
    max_s: float = Field(
        default=120.0, ge=0, description="Hand it on after this even if unsettled (recorded)."
    )
    sample_s: float = Field(default=0.5, gt=0, description="Seconds between sensor readings.")
    baselines: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="Idle [temperature C, power W] per GPU id; measured at first use if absent.",
    )

    @model_validator(mode="after")
    def _limits(self) -> SettleSpec:
        if self.max_s < self.min_s:
            raise ValueError(f"settle.max_s ({self.max_s}) must be >= min_s ({self.min_s})")
        return self


@dataclass(frozen=True, slots=True)
class SettleReport:
    """How one GPU was handed on: what it read then, and how long it was waited for."""

    temperature_c: float | None
    power_w: float | None
    #: Seconds from the GPU's last release to this hand-on (None on first use).
    waited_s: float | None
    #: False when `max_s` passed first (or the sensor never answered).
    settled: bool


@dataclass(slots=True)
class _Device:
    baseline: tuple[float, float] | None = None
    last_sample_at: float = -math.inf
    last: tuple[float, float] | None = None
    #: Start of the current run of in-tolerance samples since the last release.
    calm_since: float | None = None


class SettleTracker:
    """Per-GPU settle state, pure: samples and time come in from the caller.

    The pool records the readings it sensed (off the event loop) with `record`
    and asks `ready`; `ThermalGate` does the same with a sensor it calls itself.
    """

    def __init__(self, spec: SettleSpec) -> None:
        self.spec = spec
        self._devices: dict[str, _Device] = {}

    def _state(self, device_id: str) -> _Device:
        state = self._devices.get(device_id)
        if state is None:
            state = _Device(baseline=self.spec.baselines.get(device_id))
            self._devices[device_id] = state
        return state

    def baseline(self, device_id: str) -> tuple[float, float] | None:
        """The idle (temperature, power) this GPU is compared with, once known."""
        return self._state(device_id).baseline

    def last(self, device_id: str) -> tuple[float, float] | None:
        """The latest recorded reading (None before any, or when the sensor could not tell)."""
        return self._state(device_id).last

    def released(self, device_id: str) -> None:
        """The GPU was just given back: its settling starts now."""
        self._state(device_id).calm_since = None

    def sample_due(self, device_id: str, now: float) -> bool:
        """Whether `sample_s` has passed since the last recorded reading."""
        return now - self._state(device_id).last_sample_at >= self.spec.sample_s

    def record(self, device_id: str, reading: tuple[float, float] | None, now: float) -> None:
        """A reading taken at `now` (None: the sensor could not tell): update the calm streak."""
        state = self._state(device_id)
        state.last_sample_at = now
        state.last = reading
        if reading is None or state.baseline is None:
            state.calm_since = None
        elif self._calm(reading, state.baseline):
            if state.calm_since is None:
                state.calm_since = now
        else:
            state.calm_since = None

    def _calm(self, reading: tuple[float, float], baseline: tuple[float, float]) -> bool:
        return (
            abs(reading[0] - baseline[0]) <= self.spec.temperature_c
            and abs(reading[1] - baseline[1]) <= self.spec.power_w
        )

    def ready(self, device_id: str, released_at: float, now: float) -> bool:
        """May this GPU, released at `released_at`, be handed on at `now` (as last recorded)?"""
        waited = now - released_at
        if waited >= self.spec.max_s:
            return True
        if waited < self.spec.min_s:
            return False
        calm_since = self._state(device_id).calm_since
        return calm_since is not None and now - calm_since >= self.spec.hold_s

    def next_check(self, device_id: str, released_at: float, now: float) -> float:
        """When `ready` may next turn true for a GPU that is settling (inf when settled)."""
        if now >= released_at + self.spec.max_s:
            return math.inf
        state = self._state(device_id)
        due = min(state.last_sample_at + self.spec.sample_s, released_at + self.spec.max_s)
        if now < released_at + self.spec.min_s:
            due = min(due, released_at + self.spec.min_s)
        return due

    def hand_on(self, device_id: str, released_at: float | None, now: float) -> SettleReport:
        """Report the GPU as it is handed to its next experiment, from the reading just recorded.

        A GPU never used before in this pool is idle: its reading becomes its
        baseline unless one was given.
        """
        state = self._state(device_id)
        reading = state.last
        if released_at is None:
            if state.baseline is None and reading is not None:
                state.baseline = reading
                log.info(
                    "gpu_idle_baseline",
                    device=device_id,
                    temperature_c=reading[0],
                    power_w=reading[1],
                )
            settled = True
        else:
            calm = state.calm_since
            settled = calm is not None and now - calm >= self.spec.hold_s
        return SettleReport(
            temperature_c=reading[0] if reading else None,
            power_w=reading[1] if reading else None,
            waited_s=None if released_at is None else now - released_at,
            settled=settled,
        )


class ThermalGate:
    """A `SettleTracker` that reads its own sensor, for callers that may block (a Ray task).

    Time always comes from the caller (`now`); the sensor is called in the
    caller's thread, at most once per `sample_s` (and once more at `hand_on`).
    """

    def __init__(self, spec: SettleSpec, sensor: Sensor) -> None:
        self.spec = spec
        self.tracker = SettleTracker(spec)
        self._sensor = sensor

    def baseline(self, device_id: str) -> tuple[float, float] | None:
        """The idle (temperature, power) this GPU is compared with, once known."""
        return self.tracker.baseline(device_id)

    def released(self, device_id: str) -> None:
        """The GPU was just given back: its settling starts now."""
        self.tracker.released(device_id)

    def sample(self, device_id: str, now: float) -> tuple[float, float] | None:
        """Read the sensor now (at most once per `sample_s`) and update the calm streak."""
        if self.tracker.sample_due(device_id, now):
            self.tracker.record(device_id, read_sensor(self._sensor, device_id), now)
        return self.tracker.last(device_id)

    def ready(self, device_id: str, released_at: float, now: float) -> bool:
        """May this GPU, released at `released_at`, be handed on at `now`?"""
        if now - released_at >= self.spec.max_s:
            return True
        # Sampled from the release on, so a GPU calm early goes on at `min_s`,
        # not at `min_s + hold_s`.
        self.sample(device_id, now)
        return self.tracker.ready(device_id, released_at, now)

    def next_check(self, device_id: str, released_at: float, now: float) -> float:
        """When `ready` may next turn true for a GPU that is settling (inf when settled)."""
        return self.tracker.next_check(device_id, released_at, now)

    def hand_on(self, device_id: str, released_at: float | None, now: float) -> SettleReport:
        """Sample once more and report, as the GPU is handed to its next experiment."""
        self.tracker.record(device_id, read_sensor(self._sensor, device_id), now)
        return self.tracker.hand_on(device_id, released_at, now)


def read_sensor(sensor: Sensor, device_id: str) -> tuple[float, float] | None:
    """One reading; a sensor that raises reads as None (logged), never stalls the caller."""
    try:
        return sensor(device_id)
    except Exception as exc:  # noqa: BLE001 - a broken sensor must not stall the pool
        log.warning("gpu_sensor_failed", device=device_id, error=repr(exc))
        return None
