"""Studies: the study file, its expansion into experiments, runner choice, results, run_study.

`run_study` is exported lazily: loading a study file (`study.loading`, `study.schema`)
imports no engine client; running one brings what its kinds need when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llem_dispatch.study.loading import load_study
from llem_dispatch.study.plan import expand_study
from llem_dispatch.study.request import StudyRequest
from llem_dispatch.study.results import (
    Journal,
    ResultsDir,
    StudySummary,
    completed_keys,
    iter_records,
)
from llem_dispatch.study.runner_choice import (
    StudyRunnerFactory,
    build_pool,
    cluster_requirements,
    cluster_runner_spec,
    detect_runner,
    ensure_image,
    get_default_image,
    make_runner,
    resolve_runner,
    runner_choice,
    study_images,
)
from llem_dispatch.study.schema import (
    BuildSpec,
    Experiment,
    ReportSpec,
    RunnerSpec,
    Study,
    parse_runner_value,
)

__all__ = [
    "BuildSpec",
    "Experiment",
    "Journal",
    "ReportSpec",
    "ResultsDir",
    "RunnerSpec",
    "Study",
    "StudyRequest",
    "StudyRunnerFactory",
    "StudySummary",
    "build_pool",
    "cluster_requirements",
    "cluster_runner_spec",
    "completed_keys",
    "detect_runner",
    "ensure_image",
    "expand_study",
    "get_default_image",
    "iter_records",
    "load_study",
    "make_runner",
    "parse_runner_value",
    "resolve_runner",
    "run_study",
    "runner_choice",
    "study_images",
]

_HOMES = {"run_study": "run"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'llem_dispatch.study' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llem_dispatch.study.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from llem_dispatch.study.run import run_study
