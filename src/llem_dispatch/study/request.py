"""What `run_study` is asked: one typed request, whoever builds it (CLI, library, tests).

`StudyRequest` is built once, at the top; `StudyOptions` is the keyword form that
`run_study(study, results_dir, **options)` keeps for callers of the older signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

from llem_dispatch.dispatch import Event, RetryPolicy
from llem_dispatch.dispatch.registry import CLUSTER_ADDRESS
from llem_dispatch.gpu import GpuPool
from llem_dispatch.gpu.telemetry import TelemetryReader
from llem_dispatch.runners import ForceKill, Runner
from llem_dispatch.study.schema import RunnerSpec, Study

__all__ = ["StudyOptions", "StudyRequest"]


class StudyOptions(TypedDict, total=False):
    """`run_study`'s keyword form: the fields of `StudyRequest`, and `cluster`/`cluster_options`
    (see `StudyRequest.of`)."""

    runner: Runner | None
    pool: GpuPool | None
    resume: bool
    on_event: Callable[[Event], None] | None
    max_concurrency: int | None
    study_dir: str | Path | None
    runner_value: str | None
    runner_spec: RunnerSpec | None
    retry_policy: RetryPolicy | None
    reap_orphans: bool
    cluster: str | None
    cluster_options: Mapping[str, Any] | None
    telemetry_reader: TelemetryReader | None
    force_kill: ForceKill


@dataclass(frozen=True, slots=True)
class StudyRequest:
    """One run of a study, as typed values: what `run_study` is asked, whoever builds it
    (the CLI, a library, a test). Built once; nothing below it decides these again."""

    study: Study
    results_dir: Path
    #: Skip what succeeded in `results_dir`; run failed or interrupted experiments again.
    resume: bool = False
    #: Called with every event of the dispatcher (a progress display).
    on_event: Callable[[Event], None] | None = None
    #: A cap on simultaneous experiments, over the study's `max_concurrency`.
    max_concurrency: int | None = None
    #: The study file's folder (a `function:` module, a local runner's cwd); None: cwd.
    study_dir: Path | None = None
    #: A runner built here (a placement on this host only), with `pool` its GPUs.
    runner: Runner | None = None
    pool: GpuPool | None = None
    #: A runner choice already made (recorded with its source); else one is chosen
    #: from `runner_value` > LLEM_RUNNER > the study > auto.
    runner_spec: RunnerSpec | None = None
    runner_value: str | None = None
    #: Retries of infrastructure errors (default: the study's `retries`).
    retry_policy: RetryPolicy | None = None
    #: Reap the study's leftovers of dead runs before it, and of this run after it.
    reap_orphans: bool = True
    #: Reads this host's GPU telemetry (tests); None: NVML.
    telemetry_reader: TelemetryReader | None = None
    #: The study's force-kill switch (a second Ctrl-C sets it): its placement and its
    #: runners end what they are cancelling at once, without the stop grace.
    force_kill: ForceKill = field(default_factory=ForceKill)

    @classmethod
    def of(
        cls, study: Study, results_dir: str | Path, **options: Unpack[StudyOptions]
    ) -> StudyRequest:
        """The request of `run_study`'s keyword form. `cluster` (a Ray cluster's address)
        puts the study on that cluster, as `placement: ray` with `ray: {address: ...}`
        would; `cluster_options` go over its placement's settings block."""
        fields: dict[str, Any] = dict(options)
        cluster, over = fields.pop("cluster", None), fields.pop("cluster_options", None)
        if cluster is not None:
            shorthand = CLUSTER_ADDRESS
            settings = {**shorthand.settings(cluster), **(over or {})}
            study = study.on_placement(shorthand.placement, settings)
        elif over:
            study = study.on_placement(study.placement, over)
        if fields.get("study_dir") is not None:
            fields["study_dir"] = Path(fields["study_dir"])
        return cls(study, Path(results_dir), **fields)
