"""Studies: the study file, its expansion into experiments, runner choice, results, run_study."""

from llem_dispatch.study.loading import load_study
from llem_dispatch.study.plan import expand_study
from llem_dispatch.study.results import (
    Journal,
    ResultsDir,
    StudySummary,
    completed_keys,
    iter_records,
)
from llem_dispatch.study.run import run_study
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
