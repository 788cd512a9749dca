"""`llem-dispatch doctor`: check the host (or every host of a cluster) before a study."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.text import Text

from llem_dispatch._docker import (
    docker_available,
    engine_version,
    missing_images,
    run_probe,
    runtimes,
)
from llem_dispatch.cli.app import (
    EXIT_FAILED,
    EXIT_OK,
    app,
    fail_usage,
    make_console,
)
from llem_dispatch.cluster import check_cluster
from llem_dispatch.errors import LlemError
from llem_dispatch.gpu import GpuPool, nvml_used_memory_mb
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
    """One line of doctor's report: PASS when ok, else WARN (optional) or FAIL."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    #: A failed optional check (no GPUs on a CPU host) warns instead of failing.
    optional: bool = False


def _cluster_checks(address: str, study_file: Path | None) -> list[Check]:
    """Per host of the cluster: Docker, and the study's images (or folder, run locally)."""
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


_START_DOCKER = "Start dockerd (`sudo systemctl start docker`) or use --runner local."


def _doctor_checks(study_file: Path | None) -> list[Check]:
    """This host's checks, in the order printed: daemon, NVIDIA runtime, GPUs, study images."""
    up = docker_available()
    checks = (
        anyio.run(_daemon_checks)
        if up
        else [Check("Docker daemon", False, "not reachable", _START_DOCKER)]
    )
    checks.append(_gpu_check())
    if study_file is not None and up:
        study = load_study(study_file)
        images = study_images(study, resolve_runner("docker", study), expand_study(study))
        checks += anyio.run(_image_checks, images, study.build is not None)
    return checks


async def _daemon_checks() -> list[Check]:
    """The daemon (it answered the ping) and whether it can hand GPUs to containers."""
    try:
        server, api = await engine_version()
        version = f"{server} (API {api})"
    except LlemError:
        version = "answers /_ping"
    try:
        has_nvidia = any("nvidia" in name for name in await runtimes())
    except LlemError:
        has_nvidia = False
    return [
        Check("Docker daemon", True, version),
        _engine_check(version),
        Check(
            "NVIDIA container runtime",
            has_nvidia,
            "registered" if has_nvidia else "not registered",
            ""
            if has_nvidia
            else "Install the NVIDIA Container Toolkit for GPU "
            "passthrough; without it use --virtual-gpus.",
            optional=True,
        ),
    ]


#: Engines before this major version carry the libnetwork deadlock under container
#: churn (moby/moby#46661, moby/libnetwork#2649), fixed after 20.10.24.
FIXED_ENGINE_MAJOR = 23


def _engine_check(version: str) -> Check:
    """Warn about an engine with the known deadlock under our own container churn."""
    major = version.split(".", 1)[0]
    if not major.isdigit():
        return Check("Docker Engine version", True, "unknown", optional=True)
    affected = int(major) < FIXED_ENGINE_MAJOR
    return Check(
        "Docker Engine version",
        not affected,
        f"{version}: known to deadlock under container churn (moby/moby#46661)"
        if affected
        else f"{version}: without the 20.10 churn deadlock",
        "Upgrade the engine (23.0 or later: Docker CE, or Debian trixie's docker.io "
        "26.1.5); until then a hung daemon is detected and reported (DockerDaemonHungError)."
        if affected
        else "",
        optional=True,
    )


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


async def _image_checks(images: list[str], buildable: bool) -> list[Check]:
    """Per image: is it on the daemon, and does a container of it start and exit 0."""
    checks: list[Check] = []
    for image in images:
        try:
            present = not await missing_images([image])
        except LlemError as exc:
            checks.append(Check(f"image {image}", False, exc.message, exc.fix_suggestion))
            continue
        fix = (
            "`llem-dispatch run` will build it from the study's build: context"
            if buildable
            else f"docker build -t {image} . / docker pull"
        )
        checks.append(
            Check(
                f"image {image}",
                present,
                "present" if present else "missing",
                "" if present else fix,
            )
        )
        if present:
            checks.append(await _probe_check(image))
    return checks


async def _probe_check(image: str) -> Check:
    name = f"probe container ({image})"
    try:
        await run_probe(image)
    except LlemError as exc:
        # The container's own stderr (its tail) says most; without any, the daemon's refusal.
        stderr = getattr(exc, "stderr_snippet", "")
        return Check(name, False, stderr[-200:] if stderr else exc.message, "See the error above.")
    return Check(name, True, "ran `true`")


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
