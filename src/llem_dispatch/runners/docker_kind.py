"""The `docker` runner kind: what it needs, how it builds a DockerRunner, its doctor checks.

Registered by dotted path, so aiodocker is imported only once a study uses Docker.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import structlog

from llem_dispatch._cdi import DEFAULT_CDI_KIND, DEFAULT_SPEC_DIRS, read_specs
from llem_dispatch._docker import (
    ApiDeadlines,
    docker_available,
    docker_url,
    engine_info,
    engine_version,
    missing_images,
    run_once,
    run_probe,
    runtimes,
)
from llem_dispatch.errors import ConfigError, DockerError, LlemError
from llem_dispatch.gpu.discovery import nvml_inventory
from llem_dispatch.runners.docker import DockerRunner
from llem_dispatch.runners.kinds import DoctorCheck, RunnerKind, RunnerOptions

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
    """

    needs_image = True
    needs_engine = True
    engine = "Docker daemon"
    gpu_request = "device_requests"
    uses_study_folder = False
    reapable = True
    summary = "Docker containers"
    #: The runner class built (a subclass for engines that speak the same API).
    runner_class: type[DockerRunner] = DockerRunner

    def engine_url(self) -> str:
        """Where the engine's API is: DOCKER_HOST, else the standard local socket."""
        return docker_url()

    def available(self) -> bool:
        """Whether the engine answers here (a quick API ping)."""
        return docker_available(url=self.engine_url())

    def build(self, options: RunnerOptions, image: str | None = None) -> DockerRunner:
        """A DockerRunner for `image` with the study's container settings."""
        if image is None:
            raise ConfigError(
                f"the study names no image and the runner is {self.name}",
                fix_suggestion="Add `image:` to the study, or run with --runner local.",
            )
        passthrough = options.gpu_passthrough
        return self.runner_class(
            image,
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
            docker_host=self.engine_url(),
        )

    async def missing_images(self, images: Sequence[str]) -> list[str]:
        """Those of `images` the daemon does not have."""
        return await missing_images(images, url=self.engine_url()) if images else []

    async def check_study(self, options: RunnerOptions, images: Sequence[str]) -> None:
        """Is the `function:` module importable in each image?

        A module that sits beside the study file works with the local runner but
        not in an image that lacks it; say so now, with the fix, instead of as a
        bare ModuleNotFoundError in every experiment.
        """
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
                    image, ["python3", "-c", code], env=options.env, url=self.engine_url()
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
        if not self.available():
            return [
                DoctorCheck("Docker daemon", False, "not reachable", _START_DOCKER, not required)
            ]
        checks = await _daemon_checks()
        checks += await cdi_checks(self.engine_url(), cdi_native=False)
        for image in images:
            checks += await image_checks(image, buildable, url=self.engine_url())
        return checks


async def _daemon_checks() -> list[DoctorCheck]:
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
        DoctorCheck("Docker daemon", True, version),
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


async def image_checks(image: str, buildable: bool, *, url: str) -> list[DoctorCheck]:
    """Is the image on the engine, and does a container of it start and exit 0."""
    try:
        present = not await missing_images([image], url=url)
    except LlemError as exc:
        return [DoctorCheck(f"image {image}", False, exc.message, exc.fix_suggestion)]
    fix = (
        "`llem-dispatch run` will build it from the study's build: context"
        if buildable
        else f"docker build -t {image} . / docker pull"
    )
    checks = [
        DoctorCheck(
            f"image {image}", present, "present" if present else "missing", "" if present else fix
        )
    ]
    if present:
        checks.append(await _probe_check(image, url))
    return checks


async def _probe_check(image: str, url: str) -> DoctorCheck:
    name = f"probe container ({image})"
    try:
        await run_probe(image, url=url)
    except LlemError as exc:
        # The container's own stderr (its tail) says most; without any, the daemon's refusal.
        stderr = getattr(exc, "stderr_snippet", "")
        return DoctorCheck(
            name, False, stderr[-200:] if stderr else exc.message, "See the error above."
        )
    return DoctorCheck(name, True, "ran `true`")


async def cdi_checks(
    url: str, *, cdi_native: bool, engine: str = "Docker", kind: str = DEFAULT_CDI_KIND
) -> list[DoctorCheck]:
    """Is CDI on, which kinds and devices its specs offer, and is every GPU here named.

    `cdi_native`: the engine always reads CDI specs from the default dirs (Podman);
    else the engine's /info says its spec dirs, none when its `cdi` feature is off.
    """
    if cdi_native:
        dirs: tuple[str, ...] = DEFAULT_SPEC_DIRS
    else:
        try:
            dirs = tuple(str(d) for d in (await engine_info(url=url)).get("CDISpecDirs") or ())
        except LlemError as exc:
            return [DoctorCheck("CDI", False, exc.message, exc.fix_suggestion, optional=True)]
    if not dirs:
        return [
            DoctorCheck(
                "CDI",
                False,
                f"off in the {engine} engine: GPUs go by NVIDIA device requests",
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
