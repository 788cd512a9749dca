"""The `docker` runner kind: its engine, its images, its runner, reaping, its doctor checks.

Registered by dotted path, and light to import: the Docker client (aiodocker) is
imported inside the methods that talk to the engine, so naming the kind or
checking an image reference costs nothing. Podman's kind is this one on
another engine object (`ContainerEngine`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import structlog

from llem_dispatch._cdi import DEFAULT_CDI_KIND, DEFAULT_SPEC_DIRS, read_specs
from llem_dispatch._deadlines import ApiDeadlines
from llem_dispatch._engine import ContainerEngine, docker_engine, docker_url
from llem_dispatch.errors import (
    ConfigError,
    DockerError,
    DockerImagePullError,
    LlemError,
)
from llem_dispatch.gpu.discovery import nvml_inventory
from llem_dispatch.runners.images import check_registry_reference
from llem_dispatch.runners.kinds import DoctorCheck, ImageBuild, RunnerKind, RunnerOptions

if TYPE_CHECKING:
    from llem_dispatch.reap import ReapedContainer
    from llem_dispatch.runners.docker import DockerRunner

__all__ = ["FIXED_ENGINE_MAJOR", "DockerRunnerKind", "cdi_checks", "engine_check", "image_checks"]

log = structlog.get_logger("llem_dispatch.docker")

#: Engines before this major version carry the libnetwork deadlock under container
#: churn (moby/moby#46661, moby/libnetwork#2649), fixed after 20.10.24.
FIXED_ENGINE_MAJOR = 23

_START_DOCKER = "Start dockerd (`sudo systemctl start docker`) or use --runner local."


class DockerRunnerKind(RunnerKind):
    """The `docker` runner kind: each experiment in an ephemeral container of an image.

    Needs the Docker daemon; GPUs are asked for by device requests (visibility
    variables only on virtual GPUs); its containers are labelled for `reap`.
    Everything it asks of an engine goes to `container_engine()`, with its URL.
    """

    needs_image = True
    needs_engine = True
    engine = "Docker daemon"
    gpu_request = "device_requests"
    uses_study_folder = False
    reapable = True
    summary = "Docker containers"

    def engine_url(self) -> str:
        """Where the engine's API is: DOCKER_HOST, else the standard local socket."""
        return docker_url()

    def container_engine(self, url: str | None = None) -> ContainerEngine:
        """The engine this kind talks to (at `url`, default `engine_url()`)."""
        return docker_engine(url or self.engine_url())

    def available(self) -> bool:
        """Whether the engine answers here (a quick API ping)."""
        from llem_dispatch._docker import docker_available

        return docker_available(url=self.engine_url())

    def check_image(self, reference: str) -> str:
        """A registry reference (`name:tag`, `registry/name@sha256:...`)."""
        return check_registry_reference(reference)

    def build(self, options: RunnerOptions, image: str | None = None) -> DockerRunner:
        """A DockerRunner for `image` on this kind's engine, with the study's settings."""
        from llem_dispatch.runners.docker import DockerRunner

        if image is None:
            raise ConfigError(
                f"the study names no image and the runner is {self.name}",
                fix_suggestion="Add `image:` to the study, or run with --runner local.",
            )
        passthrough = options.gpu_passthrough
        return DockerRunner(
            image,
            engine=self.container_engine(),
            timeout=options.timeout_s,
            source=options.source,
            command=options.command,
            function=options.function,
            env=options.env,
            shm_size=options.shm_size,
            gpu_passthrough=passthrough if passthrough is not None else not options.virtual,
            silence_timeout=options.silence_timeout_s,
            network=options.network,
            user=options.user,
            cap_add=options.cap_add,
            mem_limit=options.mem_limit,
            labels=options.labels,
            stop_grace_s=options.stop_grace_s,
            exchange_base=options.exchange_base,
            source_dir=options.study_dir if options.mount_study_dir else None,
            api_deadlines=ApiDeadlines(**options.api_deadlines),
            gpu_devices=options.gpu_devices,
            cdi_kind=options.cdi_kind,
        )

    async def missing_images(
        self, images: Sequence[str], *, study_dir: Path | None = None
    ) -> list[str]:
        """Those of `images` its engine does not have."""
        from llem_dispatch._docker import missing_images

        return await missing_images(images, engine=self.container_engine()) if images else []

    def missing_image_error(self, image: str) -> LlemError:
        """Not on this kind's engine, and nothing to build it from: how to get it there."""
        engine = self.container_engine()
        cli = engine.name.lower()
        return DockerImagePullError.for_engine(engine.name)(
            f"image {image!r} is not present on {engine} and the study has no `build:` context",
            fix_suggestion=f"Build it there (`{cli} build -t {image} DIR`), pull it "
            f"(`{cli} pull {image}`), or add `build: {{context: DIR}}` to the study.",
        )

    async def build_image(
        self, image: str, build: ImageBuild, *, output: Callable[[str], None] = print
    ) -> None:
        """Build `image` on this kind's own engine (never another's)."""
        from llem_dispatch._docker import build_image

        run = functools.partial(
            build_image,
            image,
            context=build.context,
            dockerfile=build.dockerfile,
            args=dict(build.args),
            output=output,
            engine=self.container_engine(),
        )
        await anyio.to_thread.run_sync(run)

    async def reap(
        self,
        *,
        results_dir: Path | None = None,
        logs_dir: Path | None = None,
        dry_run: bool = False,
        study_over: bool = False,
        engine_url: str | None = None,
        api_deadlines: Mapping[str, float] | None = None,
    ) -> list[ReapedContainer]:
        """Remove this host's labelled containers (on its engine) whose owner is gone."""
        from llem_dispatch.reap import reap

        return await reap(
            results_dir=results_dir,
            logs_dir=logs_dir,
            dry_run=dry_run,
            study_over=study_over,
            docker_host=engine_url or self.engine_url(),
            deadlines=ApiDeadlines(**(api_deadlines or {})),
        )

    async def check_study(self, options: RunnerOptions, images: Sequence[str]) -> None:
        """Is the `function:` module importable in each image?

        A module that sits beside the study file works with the local runner but
        not in an image that lacks it; say so now, with the fix, instead of as a
        bare ModuleNotFoundError in every experiment.
        """
        from llem_dispatch._docker import run_once

        if options.function is None or options.mount_study_dir:
            return
        function = options.function
        top = function.split(":")[0].split(".")[0]
        code = (
            "import importlib.util as u, os, sys; sys.path.insert(0, os.getcwd()); "
            f"sys.exit(0 if u.find_spec({top!r}) else 3)"
        )
        for image in images:
            try:
                exit_code, stderr, _ = await run_once(
                    image, ["python3", "-c", code], env=options.env, engine=self.container_engine()
                )
            except DockerError as exc:
                if "executable file not found" in exc.message:
                    raise ConfigError(
                        f"image {image} has no python3, which `function: {function}` needs",
                        fix_suggestion="Use an image with python3, or run the experiment with "
                        "`command: [argv]` instead of `function:`.",
                    ) from exc
                raise
            if exit_code == 3:
                raise ConfigError(
                    f"`function: {function}`: module {top!r} is not importable in image "
                    f"{image} (a file beside the study is not in the image); nothing was run",
                    fix_suggestion=f"COPY {top}.py (or its package) into the image in its "
                    "Dockerfile, or set `mount_study_dir: true` to mount the study folder "
                    "read-only (development runs).",
                )
            if exit_code != 0:
                log.warning("function_check_inconclusive", image=image, stderr=stderr[-500:])

    async def doctor_checks(
        self, images: Sequence[str] = (), *, required: bool = True, buildable: bool = False
    ) -> list[DoctorCheck]:
        """The daemon, its version and NVIDIA runtime; then each image and a probe run."""
        engine = self.container_engine()
        if not self.available():
            return [
                DoctorCheck(
                    "Docker daemon",
                    False,
                    f"not reachable at {engine.url}",
                    _START_DOCKER,
                    not required,
                )
            ]
        checks = await _daemon_checks(engine)
        checks += await cdi_checks(engine, cdi_native=False)
        for image in images:
            checks += await image_checks(image, buildable, engine=engine)
        return checks


async def _daemon_checks(engine: ContainerEngine) -> list[DoctorCheck]:
    """The daemon (it answered the ping) and whether it can hand GPUs to containers."""
    from llem_dispatch._docker import engine_version, runtimes

    try:
        server, api = await engine_version(engine=engine)
        version = f"{server} (API {api})"
    except LlemError:
        version = "answers /_ping"
    try:
        has_nvidia = any("nvidia" in name for name in await runtimes(engine=engine))
    except LlemError:
        has_nvidia = False
    return [
        DoctorCheck("Docker daemon", True, f"{version} at {engine.url}"),
        engine_check(version),
        DoctorCheck(
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


def engine_check(version: str) -> DoctorCheck:
    """Warn about an engine with the known deadlock under our own container churn."""
    major = version.split(".", 1)[0]
    if not major.isdigit():
        return DoctorCheck("Docker Engine version", True, "unknown", optional=True)
    affected = int(major) < FIXED_ENGINE_MAJOR
    return DoctorCheck(
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


async def image_checks(
    image: str, buildable: bool, *, engine: ContainerEngine
) -> list[DoctorCheck]:
    """Is the image on the engine, and does a container of it start and exit 0."""
    from llem_dispatch._docker import missing_images

    try:
        present = not await missing_images([image], engine=engine)
    except LlemError as exc:
        return [DoctorCheck(f"image {image}", False, exc.message, exc.fix_suggestion)]
    cli = engine.name.lower()
    fix = (
        f"`llem-dispatch run` will build it on {engine.name} from the study's build: context"
        if buildable
        else f"{cli} build -t {image} . / {cli} pull"
    )
    where = f"on {engine.name}"
    checks = [
        DoctorCheck(
            f"image {image}",
            present,
            f"present {where}" if present else f"missing {where}",
            "" if present else fix,
        )
    ]
    if present:
        checks.append(await _probe_check(image, engine))
    return checks


async def _probe_check(image: str, engine: ContainerEngine) -> DoctorCheck:
    from llem_dispatch._docker import run_probe

    name = f"probe container ({image})"
    try:
        await run_probe(image, engine=engine)
    except LlemError as exc:
        # The container's own stderr (its tail) says most; without any, the daemon's refusal.
        stderr = getattr(exc, "stderr_snippet", "")
        return DoctorCheck(
            name, False, stderr[-200:] if stderr else exc.message, "See the error above."
        )
    return DoctorCheck(name, True, "ran `true`")


async def cdi_checks(
    engine: ContainerEngine, *, cdi_native: bool, kind: str = DEFAULT_CDI_KIND
) -> list[DoctorCheck]:
    """Is CDI on, which kinds and devices its specs offer, and is every GPU here named.

    `cdi_native`: the engine always reads CDI specs from the default dirs (Podman);
    else the engine's /info says its spec dirs, none when its `cdi` feature is off.
    """
    from llem_dispatch._docker import engine_info

    if cdi_native:
        dirs: tuple[str, ...] = DEFAULT_SPEC_DIRS
    else:
        try:
            info = await engine_info(engine=engine)
            dirs = tuple(str(d) for d in info.get("CDISpecDirs") or ())
        except LlemError as exc:
            return [DoctorCheck("CDI", False, exc.message, exc.fix_suggestion, optional=True)]
    if not dirs:
        return [
            DoctorCheck(
                "CDI",
                False,
                f"off in {engine}: GPUs go by NVIDIA device requests",
                'Add {"features": {"cdi": true}} to /etc/docker/daemon.json and restart '
                "dockerd, to hand GPUs over by UUID (`gpu_devices: cdi`).",
                optional=True,
            )
        ]
    specs = await anyio.to_thread.run_sync(read_specs, dirs)
    offered = "; ".join(
        f"{k}: {len(names)} device(s) ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
        for k, names in sorted(specs.devices.items())
    )
    checks = [
        DoctorCheck("CDI", True, f"on, spec dirs {', '.join(dirs)}"),
        DoctorCheck(
            "CDI specs",
            bool(specs.devices),
            offered or "no spec names any device",
            ""
            if specs.devices
            else f"Generate one: `sudo nvidia-ctk cdi generate "
            f"--output=/etc/cdi/nvidia.yaml` (kind {kind}).",
            optional=True,
        ),
    ]
    checks += [
        DoctorCheck("CDI spec file", False, problem, "Fix or remove the file.", optional=True)
        for problem in specs.problems
    ]
    inventory, reason = await anyio.to_thread.run_sync(nvml_inventory)
    if inventory is None:
        checks.append(DoctorCheck(f"GPUs named by {kind}", True, f"no GPU to name here ({reason})"))
        return checks
    missing = specs.missing(kind, [uuid for _, uuid in inventory])
    checks.append(
        DoctorCheck(
            f"GPUs named by {kind}",
            not missing,
            f"all {len(inventory)} by UUID"
            if not missing
            else f"{len(missing)} of {len(inventory)} not named: {', '.join(missing)}",
            ""
            if not missing
            else "Regenerate the spec: `sudo nvidia-ctk cdi generate "
            "--output=/etc/cdi/nvidia.yaml` (after a driver or GPU change).",
            optional=True,
        )
    )
    return checks
