"""`llem-dispatch doctor`: check the host (or every host of a cluster) before a study."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
import typer

from llem_dispatch._docker import docker_available
from llem_dispatch.cli.app import (
    EXIT_FAILED,
    EXIT_OK,
    app,
    fail_usage,
    make_console,
)
from llem_dispatch.errors import LlemError
from llem_dispatch.gpu import GpuPool
from llem_dispatch.study import (
    RunnerSpec,
    cluster_requirements,
    cluster_runner_spec,
    expand_study,
    load_study,
    resolve_runner,
    study_images,
)

__all__ = ["Check", "doctor"]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    #: A failed optional check (no GPUs on a CPU host) warns instead of failing.
    optional: bool = False


def _cluster_checks(address: str, study_file: Path | None) -> list[Check]:
    """Per host of the cluster: Docker, and the study's images (or folder, run locally)."""
    from llem_dispatch.cluster import check_cluster

    images: list[str] = []
    folder: list[str] = []
    spec: RunnerSpec | None = None
    if study_file is not None:
        study = load_study(study_file)
        spec = cluster_runner_spec(None, study)
        images, folder = cluster_requirements(study, spec, expand_study(study), study_file.parent)
    gpus, found = anyio.run(lambda: check_cluster(address, images=images, paths=folder))
    summary = ", ".join(f"{node}: {n} GPU(s)" for node, n in sorted(gpus.items()))
    checks = [Check("Ray cluster", True, f"{len(gpus)} node(s): {summary}")]
    for node in found:
        where = f"{node.node.label} ({node.node.ip})"
        needs_docker = bool(images) and (spec is None or spec.kind == "docker")
        checks.append(
            Check(
                f"{where} Docker daemon",
                node.docker,
                "answers" if node.docker else "not reachable",
                "" if node.docker else "Start dockerd on that host.",
                optional=not needs_docker,
            )
        )
        if images and node.docker:
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
                    optional=spec is not None and spec.kind == "auto" and node.docker,
                )
            )
    return checks


def _doctor_checks(study_file: Path | None) -> list[Check]:
    import subprocess

    checks: list[Check] = []
    up = docker_available()
    version = ""
    if up:
        proc = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        version = proc.stdout.strip() or "answers /_ping"
    checks.append(
        Check(
            "Docker daemon",
            up,
            version or "not reachable",
            "" if up else "Start dockerd (`sudo systemctl start docker`) or use --runner local.",
        )
    )
    if up:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{json .Runtimes}}"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        has_nvidia = "nvidia" in proc.stdout
        checks.append(
            Check(
                "NVIDIA container runtime",
                has_nvidia,
                "registered" if has_nvidia else "not registered",
                ""
                if has_nvidia
                else "Install the NVIDIA Container Toolkit for GPU "
                "passthrough; without it use --virtual-gpus.",
                optional=True,
            )
        )
    pool = GpuPool.detect()
    gpu_detail = ", ".join(f"{i}={pool.uuids.get(i, '?')}" for i in pool.devices) or "none"
    checks.append(
        Check(
            "GPUs (NVML)",
            bool(pool.devices),
            gpu_detail,
            ""
            if pool.devices
            else "No GPUs found: use --virtual-gpus N to schedule on virtual ids.",
            optional=True,
        )
    )
    if study_file is not None and up:
        study = load_study(study_file)
        spec = resolve_runner("docker", study)
        for image in study_images(study, spec, expand_study(study)):
            inspected = subprocess.run(
                ["docker", "image", "inspect", image], capture_output=True, timeout=15, check=False
            )
            present = inspected.returncode == 0
            checks.append(
                Check(
                    f"image {image}",
                    present,
                    "present" if present else "missing",
                    ""
                    if present
                    else (
                        "`llem-dispatch run` will build it from the study's build: context"
                        if study.build
                        else f"docker build -t {image} . / docker pull"
                    ),
                )
            )
            if present:
                probe = subprocess.run(
                    [
                        "docker",
                        "run",
                        "--rm",
                        "--network",
                        "none",
                        "--label",
                        "llem.managed=1",
                        "--label",
                        "llem.probe=1",
                        image,
                        "true",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                checks.append(
                    Check(
                        f"probe container ({image})",
                        probe.returncode == 0,
                        "ran `true`" if probe.returncode == 0 else probe.stderr.strip()[-200:],
                        "" if probe.returncode == 0 else "See the error above.",
                    )
                )
    return checks


@app.command()
def doctor(
    study_file: Annotated[Path | None, typer.Argument(help="Optional study to check.")] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray", metavar="ADDRESS", help="Check every host of this Ray cluster instead."
        ),
    ] = None,
) -> None:
    """Check the host: Docker daemon, NVIDIA runtime, GPUs, a study's images, a probe run."""
    console = make_console()
    try:
        checks = (
            _cluster_checks(ray_address, study_file)
            if ray_address is not None
            else _doctor_checks(study_file)
        )
    except LlemError as exc:
        raise fail_usage(exc.message, exc.fix_suggestion) from exc
    for check in checks:
        mark = (
            "[green]PASS[/]"
            if check.ok
            else "[yellow]WARN[/]"
            if check.optional
            else "[red]FAIL[/]"
        )
        console.print(f"{mark} {check.name}: {check.detail}", markup=True)
        if check.fix:
            console.print(f"     fix: {check.fix}")
    critical = [c for c in checks if not c.ok and not c.optional]
    raise typer.Exit(EXIT_FAILED if critical else EXIT_OK)
