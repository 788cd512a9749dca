"""`llem-dispatch doctor`: check the host (or every host of a cluster) before a study."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.text import Text

from llem_dispatch.cli.app import (
    EXIT_FAILED,
    EXIT_OK,
    EngineUrlOption,
    app,
    fail_usage,
    make_console,
    use_engine_url,
)
from llem_dispatch.cluster import check_cluster
from llem_dispatch.dispatch import placement_class
from llem_dispatch.errors import LlemError
from llem_dispatch.gpu import GpuPool, nvml_used_memory_mb
from llem_dispatch.runners import DoctorCheck, RunnerKind, get_runner_kind
from llem_dispatch.runners.kinds import AUTO, AUTO_ORDER, kind_origin, registered_names
from llem_dispatch.study import (
    RunnerSpec,
    Study,
    cluster_requirements,
    cluster_runner_spec,
    expand_study,
    load_study,
    runner_choice,
    study_images,
)

__all__ = ["Check", "doctor"]

#: One line of doctor's report (each runner kind adds its own).
Check = DoctorCheck


def _cluster_checks(address: str, study_file: Path | None) -> list[Check]:
    """Per host of the cluster: the runner's engine, the study's images (or its folder)."""
    images: list[str] = []
    folder: list[str] = []
    runner = AUTO
    chosen: RunnerKind | None = None
    if study_file is not None:
        study = load_study(study_file)
        spec = cluster_runner_spec(None, study)
        runner, chosen = spec.kind, None if spec.auto else spec.runner_kind()
        images, folder = cluster_requirements(study, spec, expand_study(study), study_file.parent)
    gpus, found = anyio.run(
        lambda: check_cluster(address, runner=runner, images=images, paths=folder)
    )
    summary = ", ".join(f"{node}: {n} GPU(s)" for node, n in sorted(gpus.items()))
    checks = [Check("Ray cluster", True, f"{len(gpus)} node(s): {summary}")]
    for node in found:
        where = f"{node.node.label} ({node.node.ip})"
        kind = node.kind(runner, has_image=bool(images))
        for name, answers in node.engines.items():
            engine_kind = get_runner_kind(name)
            engine = engine_kind.engine
            checks.append(
                Check(
                    f"{where} {engine}",
                    answers,
                    "answers" if answers else "not reachable",
                    "" if answers else f"Start the {engine} on that host.",
                    optional=not (images and chosen is engine_kind),
                )
            )
        if images and kind.needs_image:
            checks.append(
                Check(
                    f"{where} images",
                    not node.missing_images,
                    "missing: " + ", ".join(node.missing_images)
                    if node.missing_images
                    else "all present: " + ", ".join(images),
                    "Build or pull them on that host." if node.missing_images else "",
                )
            )
        if folder:
            checks.append(
                Check(
                    f"{where} study folder",
                    not node.missing_paths,
                    folder[0] + (" missing" if node.missing_paths else " present"),
                    "Copy the study folder to the same path there." if node.missing_paths else "",
                    optional=not kind.uses_study_folder,
                )
            )
    return checks


def _doctor_checks(study_file: Path | None) -> list[Check]:
    """This host's checks: the runner kinds registered, each kind's own, then the GPUs.

    A study given (or LLEM_RUNNER) that names a kind gets only that kind's lines
    (a study on a file-image kind sees nothing of Docker's); under `auto` every
    kind's, failing for the kinds the auto rule may take. Its images are checked
    by the kinds that run images, each on its own engine.
    """
    study = load_study(study_file) if study_file is not None else None
    spec = runner_choice(None, study) if study is not None else None
    chosen = spec.runner_kind() if spec is not None else None
    names = registered_names()
    listing = ", ".join(f"{name} ({kind_origin(name)})" for name in names)
    checks = [Check("runner kinds", True, listing)]
    for name in [chosen.name] if chosen is not None else names:
        try:
            kind = get_runner_kind(name)
        except LlemError as exc:
            checks.append(
                Check(f"runner {name}", False, exc.message, exc.fix_suggestion, chosen is None)
            )
            continue
        # With a kind chosen, the other kinds' lines are worth knowing but need not pass;
        # under `auto`, those of the kinds the auto rule may take.
        required = chosen is kind or (chosen is None and name in AUTO_ORDER)
        images = _study_images(study, kind, explicit=chosen is kind) if study else []
        if study_file is not None:
            images = [kind.resolve_image(i, study_file.parent.resolve()) for i in images]
        buildable = study is not None and study.build is not None
        checks += anyio.run(
            functools.partial(kind.doctor_checks, images, required=required, buildable=buildable)
        )
    checks.append(_gpu_check())
    return checks


def _placement_checks(name: str | None, study_file: Path | None) -> list[Check]:
    """The placement's own lines (`Placement.doctor_checks`), with the study's settings."""
    study = load_study(study_file) if study_file is not None else None
    if name is None and study is not None:
        name = study.placement
    if name is None:
        return []
    if study is not None and name != study.placement:
        study = study.on_placement(name)
    settings = study.placement_settings() if study is not None else None
    cls = placement_class(name)
    return anyio.run(cls.doctor_checks, settings, Path.cwd())


def _study_images(study: Study, kind: RunnerKind, *, explicit: bool) -> list[str]:
    """The study's images, for a kind that runs images (chosen, or the study names one)."""
    if not kind.needs_image or not (explicit or study.image or study.images):
        return []
    spec = runner_choice(None, study) if explicit else None
    return study_images(study, spec or RunnerSpec(kind.name, study.image), expand_study(study))


def _gpu_line(pool: GpuPool, device: str) -> str:
    """'0=GPU-1234 (NVIDIA H200, 3 MiB in use)': what a study's residual check will see."""
    used = nvml_used_memory_mb(device)
    facts = [pool.names.get(device, "")] + ([f"{used:.0f} MiB in use"] if used is not None else [])
    detail = ", ".join(f for f in facts if f)
    return f"{device}={pool.uuids.get(device, '?')}" + (f" ({detail})" if detail else "")


def _gpu_check() -> Check:
    pool = GpuPool.detect()
    gpu_detail = ", ".join(_gpu_line(pool, i) for i in pool.devices) or "none"
    return Check(
        "GPUs (NVML)",
        bool(pool.devices),
        gpu_detail,
        "" if pool.devices else "No GPUs found: use --virtual-gpus N to schedule on virtual ids.",
        optional=True,
    )


@app.command()
def doctor(
    study_file: Annotated[Path | None, typer.Argument(help="Optional study to check.")] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray", metavar="ADDRESS", help="Check every host of this Ray cluster instead."
        ),
    ] = None,
    placement: Annotated[
        str | None,
        typer.Option(
            "--placement",
            metavar="NAME",
            help="Also check this placement (e.g. slurm: it answers, its partitions and "
            "GPUs, a job writes where you are). Default: the study's.",
        ),
    ] = None,
    engine_url: EngineUrlOption = None,
) -> None:
    """Check the host: each runner kind (Docker daemon, NVIDIA runtime, a study's images,
    a probe run), the GPUs, and the study's placement."""
    console = make_console()
    use_engine_url(engine_url)
    try:
        checks = (
            _cluster_checks(ray_address, study_file)
            if ray_address is not None
            else _doctor_checks(study_file)
        )
        checks += _placement_checks(placement, study_file)
    except LlemError as exc:
        raise fail_usage(exc.message, exc.fix_suggestion) from exc
    for check in checks:
        mark = (
            ("PASS", "green")
            if check.ok
            else ("WARN", "yellow")
            if check.optional
            else ("FAIL", "red")
        )
        console.print(Text.assemble(mark, f" {check.name}: {check.detail}"))
        if check.fix:
            console.print(f"     fix: {check.fix}")
    critical = [c for c in checks if not c.ok and not c.optional]
    raise typer.Exit(EXIT_FAILED if critical else EXIT_OK)
