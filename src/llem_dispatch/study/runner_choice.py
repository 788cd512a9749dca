"""Runner choice: which runner (and image) a study runs on, built from its fields.

explicit > LLEM_RUNNER > the study's `runner:` > the auto rule; per-backend
images; the study's image built when missing; the GPU pool from options. What
each kind needs, how it builds its runner, and its images (their references,
presence and build, on its own engine) are the kind's (`runners.kinds`).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import anyio
import structlog

from llem_dispatch.dispatch import HostContext, HostGpus
from llem_dispatch.errors import ConfigError
from llem_dispatch.gpu import GpuPool
from llem_dispatch.runners import RoutingRunner, Runner, RunnerKind, RunnerOptions
from llem_dispatch.runners.kinds import AUTO, ImageBuild, choose_auto, kinds_for
from llem_dispatch.study.schema import (
    Experiment,
    RunnerSpec,
    Study,
    interpolate,
    parse_runner_value,
)

__all__ = [
    "StudyRunnerFactory",
    "build_pool",
    "check_function_importable",
    "cluster_requirements",
    "cluster_runner_spec",
    "detect_runner",
    "ensure_image",
    "get_default_image",
    "host_gpus",
    "make_runner",
    "resolve_runner",
    "runner_choice",
    "runner_options",
    "sandbox_widenings",
    "study_images",
]

log = structlog.get_logger("llem_dispatch.study")


def runner_choice(
    explicit: str | None, study: Study, *, environ: Mapping[str, str] | None = None
) -> RunnerSpec | None:
    """explicit > LLEM_RUNNER > study file; None when the first one set says auto (or none is)."""
    env = os.environ if environ is None else environ
    for value, source in (
        (explicit, "explicit"),
        (env.get("LLEM_RUNNER"), "env"),
        (study.runner, "study"),
    ):
        if value:
            spec = parse_runner_value(value)
            if spec.auto:
                return None
            kind = spec.runner_kind()
            image = spec.image or study.image if kind.needs_image else None
            if image is not None and spec.image is None:
                _check_reference(kind, image, f"the study's `image: {image}`")
            return RunnerSpec(spec.kind, image, source)
    return None


def _check_reference(kind: RunnerKind, image: str, what: str) -> str:
    """`image` as `kind` takes it, or a `ConfigError` naming what gave it and the fix."""
    try:
        return kind.check_image(image)
    except ValueError as exc:
        raise ConfigError(
            f"{what} cannot run on the {kind.name} runner: {exc}",
            fix_suggestion=f"Give an image the {kind.name} runner runs, or choose the kind "
            "this image is for (--runner / LLEM_RUNNER / `runner:`).",
        ) from exc


def resolve_runner(
    explicit: str | None,
    study: Study,
    *,
    environ: Mapping[str, str] | None = None,
    probe: Callable[[], bool] | None = None,
) -> RunnerSpec:
    """explicit > LLEM_RUNNER > study file > the auto rule (`detect_runner`)."""
    chosen = runner_choice(explicit, study, environ=environ)
    return chosen if chosen is not None else detect_runner(study, probe=probe)


def detect_runner(study: Study, *, probe: Callable[[], bool] | None = None) -> RunnerSpec:
    """`auto`: docker if the study has an image and a daemon answers, else local (said once).

    `probe` stands in for the engine's answer (tests).
    """
    kind = choose_auto(
        has_image=_has_image(study),
        probe=None if probe is None else (lambda _kind: probe()),
    )
    return RunnerSpec(kind.name, study.image if kind.needs_image else None, "auto")


def _has_image(study: Study) -> bool:
    return bool(study.image or study.images)


def cluster_runner_spec(explicit: str | None, study: Study) -> RunnerSpec:
    """On a cluster: explicit > LLEM_RUNNER > study file, else `auto`, decided on each node."""
    return runner_choice(explicit, study) or RunnerSpec(AUTO, study.image, "auto")


def cluster_requirements(
    study: Study, spec: RunnerSpec, experiments: Iterable[Experiment], study_dir: Path
) -> tuple[list[str], list[str]]:
    """What a host needs to run the study: its images (docker) and its folder (local).

    Under `auto` both: each node's own answer decides which it uses.
    """
    kinds = kinds_for(spec.kind)
    # An explicit image kind needs its image (an error here if the study names none).
    runs_image = any(k.needs_image for k in kinds) and (not spec.auto or _has_image(study))
    images = study_images(study, spec, experiments) if runs_image else []
    paths = [str(study_dir.resolve())] if any(k.uses_study_folder for k in kinds) else []
    return images, paths


def get_default_image(
    backend: str,
    images: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    kind: RunnerKind | None = None,
) -> str:
    """The image for a backend: LLEM_IMAGE_<BACKEND> > the study's `images:` > error.

    An image from the environment is checked by `kind` (default: the auto rule's).
    """
    env = os.environ if environ is None else environ
    var = "LLEM_IMAGE_" + re.sub(r"\W", "_", backend).upper()
    if env.get(var):
        kinds = [kind] if kind is not None else [k for k in kinds_for(AUTO) if k.needs_image]
        for checker in kinds:
            _check_reference(checker, env[var], f"{var}={env[var]}")
        return env[var]
    if images and backend in images:
        return images[backend]
    raise ConfigError(
        f"no image configured for backend {backend!r}",
        fix_suggestion=f"Set {var}=IMAGE or add `images: {{{backend}: IMAGE}}` to the study.",
    )


def study_images(study: Study, spec: RunnerSpec, experiments: Iterable[Experiment]) -> list[str]:
    """Every image the study will run, resolved per backend when `images:` is used."""
    if spec.image:
        return [spec.image]
    if study.images:
        kind = None if spec.auto else spec.runner_kind()
        backends = sorted({str(e.config.get(study.image_field)) for e in experiments})
        return [get_default_image(b, study.images, kind=kind) for b in backends]
    if study.image:
        return [study.image]
    raise ConfigError(
        f"the study names no image and the runner is {spec.kind}",
        fix_suggestion="Add `image:` to the study, or run with --runner local.",
    )


#: Environment variables that change what code a process loads.
_LOADER_ENV = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "PYTHONSTARTUP")


def sandbox_widenings(study: Study) -> list[str]:
    """What in the study widens the container sandbox (capabilities, network, root, loaders)."""
    found = [f"cap_add: {cap} (a capability back in the container)" for cap in study.cap_add]
    if study.network == "host":
        found.append("network: host (the container shares the host's network stack)")
    if study.user is not None and study.user.split(":")[0] in {"0", "root"}:
        found.append(f"user: {study.user!r} (root in the container, explicitly)")
    found += [f"env: {name} (changes what code loads)" for name in _LOADER_ENV if name in study.env]
    return found


def warn_sandbox_widenings(study: Study) -> None:
    """One warning for each widening of the sandbox, so none goes unnoticed."""
    for widening in sandbox_widenings(study):
        log.warning(
            "sandbox_widened",
            study=study.name,
            widening=widening,
            message="The study widens the container sandbox; keep it only if you mean it.",
        )


def runner_options(
    study: Study,
    spec: RunnerSpec,
    *,
    study_dir: Path,
    labels: Mapping[str, str] | None = None,
    virtual: bool = False,
    exchange_base: Path | None = None,
) -> RunnerOptions:
    """The study's settings as the plain values a runner kind builds from."""
    return RunnerOptions(
        command=tuple(study.command) if study.command is not None else None,
        function=study.function,
        timeout_s=study.timeout_s,
        silence_timeout_s=study.silence_timeout_s,
        stop_grace_s=study.stop_grace_s,
        source=spec.source,
        env=dict(study.env),
        study_dir=study_dir,
        cwd=study_dir / study.workdir if study.workdir else study_dir,
        mount_study_dir=study.mount_study_dir,
        exchange_base=exchange_base,
        labels={**study.labels, **(labels or {})},
        virtual=virtual,
        gpu_passthrough=study.gpu_passthrough,
        shm_size=study.shm_size,
        network=study.network,
        user=study.user,
        cap_add=tuple(study.cap_add),
        mem_limit=study.mem_limit,
        api_deadlines=dict(study.docker_deadlines),
        gpu_devices=study.gpu_devices,
        cdi_kind=study.cdi_kind,
    )


def make_runner(
    study: Study,
    spec: RunnerSpec,
    *,
    study_dir: Path,
    labels: Mapping[str, str] | None = None,
    experiments: Iterable[Experiment] = (),
    virtual: bool = False,
    exchange_base: Path | None = None,
) -> Runner:
    """Build the runner a study asks for, through its kind (one per backend with `images:`)."""
    kind = spec.runner_kind()
    options = runner_options(
        study,
        spec,
        study_dir=study_dir,
        labels=labels,
        virtual=virtual,
        exchange_base=exchange_base,
    )
    if not kind.needs_image:
        return kind.build(options)
    warn_sandbox_widenings(study)
    if spec.image is None and study.images:
        experiments = list(experiments)
        backends = sorted({str(e.config.get(study.image_field)) for e in experiments})
        return RoutingRunner(
            study.image_field,
            {
                b: kind.build(options, get_default_image(b, study.images, kind=kind))
                for b in backends
            },
        )
    images = study_images(study, spec, experiments)
    return kind.build(options, images[0])


@dataclass(frozen=True)
class StudyRunnerFactory:
    """Builds a study's runner where its attempts run: this host, or a cluster node.

    Pickled and shipped to each node by a remote placement. A runner left on
    `auto` is decided per host: docker where a daemon answers. Exchange dirs go
    in the results dir on the driver's own host, else in the node's temp dir; a
    failure's record names the node that keeps it.
    """

    study: Study
    spec: RunnerSpec
    study_dir: Path
    labels: Mapping[str, str]
    #: One experiment per backend (all `make_runner` needs to route by `image_field`).
    experiments: tuple[Experiment, ...]
    exchange_base: Path

    def __call__(self, node: HostContext) -> Runner:
        spec = detect_runner(self.study) if self.spec.auto else self.spec
        exchange: Path | None = None
        if node.driver_host:
            exchange = self.exchange_base
            exchange.mkdir(parents=True, exist_ok=True, mode=0o700)
        return make_runner(
            self.study,
            spec,
            study_dir=self.study_dir,
            labels=self.labels,
            experiments=self.experiments,
            virtual=node.virtual,
            exchange_base=exchange,
        )


async def check_function_importable(
    study: Study,
    spec: RunnerSpec,
    experiments: Iterable[Experiment],
    *,
    study_dir: Path | None = None,
) -> None:
    """Before anything runs: what the kind can check once for every run (for docker:
    is the `function:` module importable in each image?)."""
    kind = spec.runner_kind()
    images = study_images(study, spec, experiments) if kind.needs_image else []
    options = runner_options(study, spec, study_dir=study_dir or Path.cwd())
    await kind.check_study(options, images)


def ensure_image(
    study: Study,
    image: str,
    *,
    kind: RunnerKind,
    study_dir: Path,
    output: Callable[[str], None] = print,
) -> bool:
    """Build `image` from the study's `build:` context if `kind` lacks it; True if it was built.

    The kind asks its own engine (Podman through its API, a file kind its files),
    never another kind's; a missing image without `build:` is refused by it.
    """
    build = None
    if study.build is not None:
        build = ImageBuild(
            context=(study_dir / study.build.context).resolve(),
            dockerfile=study.build.dockerfile,
            args={key: interpolate(value) for key, value in study.build.args.items()},
        )
    return anyio.run(
        functools.partial(kind.ensure_image, image, build=build, study_dir=study_dir, output=output)
    )


def host_gpus(
    study: Study,
    *,
    gpu_ids: list[str] | Literal["auto"] | None = None,
    virtual_gpus: int | None = None,
) -> HostGpus:
    """This host's GPUs: the command line's choice, else the study's, else detection."""
    if virtual_gpus is not None:
        return HostGpus(virtual=virtual_gpus)
    chosen = gpu_ids if gpu_ids is not None else study.gpu_ids
    if chosen is None and study.virtual_gpus is not None:
        return HostGpus(virtual=study.virtual_gpus)
    # Real GPUs: a device still holding memory is waited out before it is handed on.
    if chosen == "auto":
        return HostGpus(ids="auto", residual_memory_mb=study.residual_memory_mb)
    ids = tuple(chosen) if chosen is not None else None
    return HostGpus(ids=ids, residual_memory_mb=study.residual_memory_mb)


def build_pool(
    study: Study,
    *,
    gpu_ids: list[str] | Literal["auto"] | None = None,
    virtual_gpus: int | None = None,
) -> GpuPool:
    """The GPU pool from command-line options, else the study, else detection."""
    chosen = host_gpus(study, gpu_ids=gpu_ids, virtual_gpus=virtual_gpus)
    return chosen.pool(cooldown_s=study.experiment_gap_s, settle=study.settle)
