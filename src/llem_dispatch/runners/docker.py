"""DockerRunner: one ephemeral container per experiment, through the Engine API (aiodocker).

Owns the container's whole life: create, start, follow logs, wait (bounded),
collect files, remove. aiodocker's and aiohttp's errors are translated to
llem-dispatch's own classes here, once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiodocker
import aiohttp
import anyio
import structlog
from pydantic import BaseModel

from llem_dispatch import _labels
from llem_dispatch._cdi import DEFAULT_CDI_KIND, DEFAULT_SPEC_DIRS, check_kind, read_specs
from llem_dispatch._docker import (
    DEFAULT_DEADLINES,
    ApiDeadlines,
    ContainerEngine,
    docker_engine,
    engine_info,
    engine_version_of,
    image_missing_error,
    inspect_image,
    version_info,
)
from llem_dispatch._exchange import (
    CONTAINER_EXCHANGE_DIR,
    DEFAULT_MAX_RESULT_BYTES,
    ExchangeDir,
)
from llem_dispatch._sizes import parse_size
from llem_dispatch.errors import ConfigError
from llem_dispatch.runners._backend import (
    LOG_DRAIN_S,
    Gate,
    check_run_options,
    helper_script,
)
from llem_dispatch.runners._container_run import DOCKER_ERRORS, ContainerRun, cpu_update
from llem_dispatch.runners._gate import gated_spec
from llem_dispatch.runners._lifecycle import DEFAULT_SECRET_ENV, run_lifecycle
from llem_dispatch.runners._quiet import thread_env
from llem_dispatch.runners.gpu_request import (
    GPU_DEVICE_MODES,
    EngineGpuFacts,
    GpuDevices,
    GpuRequestMode,
    decide_mode,
    device_requests,
    visibility_env,
)
from llem_dispatch.runners.protocol import CpuPlacement, Outcome, RunObserver

__all__ = [
    "DOCKER_ERRORS",
    "HELPER_CONTAINER_PATH",
    "LOG_DRAIN_S",
    "SOURCE_CONTAINER_PATH",
    "DockerRunner",
    "parse_size",
]


HELPER_CONTAINER_PATH = "/opt/llem/llem_container.py"
#: At close, how long to retry removals that already failed once (daemon down or stuck).
PENDING_RETRY_S = 5.0
#: Where `source_dir` is mounted (read-only) and put on PYTHONPATH.
SOURCE_CONTAINER_PATH = "/opt/llem/src"

log = structlog.get_logger("llem_dispatch.docker")


def _engine_gpu_devices(
    engine: ContainerEngine, asked: GpuDevices, passthrough: bool
) -> GpuDevices:
    """How GPUs are asked of `engine`: as asked, or by CDI name on an engine that knows no other."""
    if engine.cdi_only and passthrough and asked == "nvidia":
        raise ValueError(f"{engine.name} asks for GPUs by CDI name only: gpu_devices='cdi'")
    return "cdi" if engine.cdi_only else asked


def _without_secrets(env: Mapping[str, str] | None, secret_env: Sequence[str]) -> dict[str, str]:
    """`env` as given, refused when it holds a secret (those go as a 0600 file instead)."""
    secrets = {n.upper() for n in secret_env}
    for key in env or {}:
        if key.upper() in secrets:
            raise ValueError(
                f"env {key} is a secret: it would be visible in docker "
                "inspect; set it on the host instead (passed as a file)"
            )
    return dict(env or {})


class DockerRunner:
    """Runs each experiment in its own ephemeral container on a Docker Engine API.

    Args:
        engine: the engine it talks to (Docker, or Podman's compatible API), with
            its URL and quirks; default Docker at `docker_host` (else DOCKER_HOST).
        image: the image to run (never pulled implicitly: build or pull it first).
        timeout: seconds from start before the container is killed (`DockerTimeoutError`).
        source: how the runner was chosen (recorded in every result).
        result_model: pydantic model to validate results with; default `ExperimentResult`.
        command: argv to run instead of the image's CMD.
        function: `module:function` run through the mounted stdlib helper
            (any image with python3); exclusive with `command`.
        env: extra environment for the container (never put secrets here).
        shm_size: /dev/shm size (vLLM needs several GiB).
        gpu_passthrough: False on hosts without the NVIDIA toolkit: ids are still
            assigned and exported as env, but no device request is made.
        secret_env: host variables passed as a 0600 file, never as container Env.
        silence_timeout: kill with `DockerHangError` after this many seconds without output.
        network: Docker network mode ('none' for isolated, faster starts).
        user: 'uid:gid' to run as (default: the caller's own ids when the caller is
            not root, else the image's user); cap_add: capabilities kept (all others dropped).
        source_dir: a host folder mounted read-only and put on PYTHONPATH (development
            runs of a `function:` whose module is not in the image).
        api_deadlines: how long each Docker API call may take before the daemon counts
            as hung (`DockerDaemonHungError`, retried as transient).
        gpu_devices: how GPUs are asked for: `cdi` (`<cdi_kind>=<UUID>`, Container
            Device Interface), `nvidia` (NVIDIA device requests) or `auto` (CDI when
            the engine has it on and a spec names the GPUs); see `gpu_request`.
        cdi_kind: the CDI kind naming the GPUs (`nvidia.com/gpu`, NVIDIA's toolkit).
    """

    runner_type = "docker"

    def __init__(
        self,
        image: str,
        *,
        timeout: float | None = None,
        source: str = "explicit",
        result_model: type[BaseModel] | None = None,
        command: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        shm_size: int | str = "8g",
        function: str | None = None,
        gpu_passthrough: bool = True,
        secret_env: Sequence[str] = DEFAULT_SECRET_ENV,
        silence_timeout: float | None = None,
        network: str | None = None,
        user: str | None = None,
        cap_add: Sequence[str] = (),
        mem_limit: int | str | None = None,
        labels: Mapping[str, str] | None = None,
        exchange_base: str | Path | None = None,
        max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
        docker_host: str | None = None,
        engine: ContainerEngine | None = None,
        stop_grace_s: float = 10.0,
        log_driver: str = "none",
        source_dir: str | Path | None = None,
        api_deadlines: ApiDeadlines = DEFAULT_DEADLINES,
        gpu_devices: GpuDevices = "auto",
        cdi_kind: str = DEFAULT_CDI_KIND,
    ) -> None:
        if command is not None and function is not None:
            raise ValueError("give either command= or function=, not both")
        check_run_options(timeout=timeout, silence_timeout=silence_timeout, function=function)
        if not image or any(ch.isspace() for ch in image):
            raise ValueError(f"invalid image reference {image!r}")
        #: The engine it talks to, with its URL: named in every error and log.
        self.engine = engine if engine is not None else docker_engine(docker_host)
        gpu_devices = _engine_gpu_devices(self.engine, gpu_devices, gpu_passthrough)
        self.runner_type = self.engine.runner_type
        self.image = image
        self.timeout = timeout
        self.source = source
        self.result_model = result_model
        self.command = list(command) if command is not None else None
        self.function = function
        self.env = _without_secrets(env, secret_env)
        self.shm_size = parse_size(shm_size)
        self.gpu_passthrough = gpu_passthrough
        self.secret_env = tuple(secret_env)
        self.silence_timeout = silence_timeout
        self.network = network
        self.user = user
        self.cap_add = list(cap_add)
        self.mem_limit = parse_size(mem_limit) if mem_limit is not None else None
        self.labels = dict(labels or {})
        self.exchange_base = exchange_base
        self.max_result_bytes = max_result_bytes
        self.stop_grace_s = stop_grace_s
        self.log_driver = log_driver
        self.source_dir = Path(source_dir).resolve() if source_dir is not None else None
        self.deadlines = api_deadlines
        if gpu_devices not in GPU_DEVICE_MODES:
            raise ValueError(f"gpu_devices must be one of {GPU_DEVICE_MODES}, got {gpu_devices!r}")
        self.gpu_devices: GpuDevices = gpu_devices
        self.cdi_kind = check_kind(cdi_kind)
        self._gpu_facts: EngineGpuFacts | None = None
        #: The mode decided for the study's GPUs by `check_gpus` (before anything ran).
        self._gpu_mode: GpuRequestMode | None = None
        self._checked_gpus: frozenset[str] = frozenset()
        self._docker: aiodocker.Docker | None = None
        self._digest: str | None = None
        self._image_config: dict[str, Any] | None = None
        #: Containers whose removal failed (engine down or stuck): retried, else left to reap.
        self.pending_removal: set[str] = set()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Remove any container still pending removal, close the API client; idempotent."""
        if self.pending_removal and self._docker is not None and not self._closed:
            # Only removals that already failed are pending: the engine is down or
            # stuck, so a short try, then the ids are named for `reap`.
            with anyio.CancelScope(shield=True), anyio.move_on_after(PENDING_RETRY_S):
                await self.remove_pending()
        if self.pending_removal:
            log.warning(
                "containers_left_for_reap",
                engine=str(self.engine),
                containers=sorted(c[:12] for c in self.pending_removal),
                fix=f"{self.engine} did not remove them; once it answers again, run "
                f"`llem-dispatch reap --engine-url {self.engine.url}` (their logs are kept).",
            )
        self._closed = True
        if self._docker is not None:
            docker, self._docker = self._docker, None
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await docker.close()

    def client(self) -> aiodocker.Docker:
        """The API client of its engine (made on first use; closed by `aclose`)."""
        if self._closed:
            raise RuntimeError("DockerRunner is closed")
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self.engine.url)
        return self._docker

    # -- image -------------------------------------------------------------------

    async def image_digest(self) -> str:
        """The image's repo digest (or id when it has none); looked up once."""
        if self._digest is None:
            info = await inspect_image(
                self.client(), self.image, deadline=self.deadlines.image, engine=self.engine
            )
            if info is None:
                raise image_missing_error(self.image, engine=self.engine)
            repo_digests = info.get("RepoDigests") or []
            self._digest = str(repo_digests[0] if repo_digests else info["Id"])
            self._image_config = info.get("Config") or {}
        return self._digest

    # -- GPUs ----------------------------------------------------------------------

    async def gpu_facts(self) -> EngineGpuFacts:
        """Is CDI on in the engine, and what its spec dirs offer (asked once).

        An engine that reads CDI natively (Podman) always has it, from the default dirs.
        """
        if self._gpu_facts is None:
            if self.engine.cdi_native:
                dirs: tuple[str, ...] = DEFAULT_SPEC_DIRS
            else:
                info = await engine_info(engine=self.engine)
                dirs = tuple(str(d) for d in info.get("CDISpecDirs") or ())
            specs = await anyio.to_thread.run_sync(read_specs, dirs)
            self._gpu_facts = EngineGpuFacts(self.engine.name, bool(dirs), dirs, specs)
        return self._gpu_facts

    async def check_gpus(self, gpus: Sequence[str]) -> None:
        """Before anything runs: decide how the study's `gpus` are asked for, once.

        Raises `ConfigError` (with the fix) when `gpu_devices: cdi` cannot name
        them, or when the engine is too old to honour device requests; `auto`
        settles on CDI or NVIDIA requests here, for every run.
        """
        if self.engine.min_gpu_version is not None:
            await self._check_engine_version(gpus)
        if not gpus or not self.gpu_passthrough:
            return
        facts = None if self.gpu_devices == "nvidia" else await self.gpu_facts()
        mode, why = decide_mode(self.gpu_devices, self.cdi_kind, gpus, facts)
        self._gpu_mode, self._checked_gpus = mode, frozenset(gpus)
        log.info("gpu_request_mode", mode=mode, asked=self.gpu_devices, why=why, gpus=list(gpus))

    async def _check_engine_version(self, gpus: Sequence[str]) -> None:
        """It answers (said with how to start it); with GPUs, it honours device requests."""
        info = await version_info(engine=self.engine)
        if not gpus or not self.gpu_passthrough:
            return
        text, version = engine_version_of(info, self.engine.name)
        assert self.engine.min_gpu_version is not None
        if version is None or version < self.engine.min_gpu_version:
            wanted = ".".join(str(n) for n in self.engine.min_gpu_version)
            raise ConfigError(
                f"{self.engine.name} {text or '(version unknown)'} at {self.engine.url}: its "
                f"Docker-compatible API ignores device requests before {wanted}, so every "
                "container would see every GPU; nothing was run",
                fix_suggestion=f"Upgrade {self.engine.name} to {wanted} or later, or run this "
                "study with `runner: docker`; for a CPU-only study, set `virtual_gpus: N`.",
            )

    async def gpu_mode_for(self, gpus: Sequence[str]) -> GpuRequestMode:
        """How this run's `gpus` are asked for (decided by `check_gpus`, else now)."""
        if not self.gpu_passthrough:
            return "env"
        if not gpus:  # nothing to ask the engine for
            return self._static_mode()
        if self._gpu_mode is not None and self._checked_gpus.issuperset(gpus):
            return self._gpu_mode
        facts = None if self.gpu_devices == "nvidia" else await self.gpu_facts()
        return decide_mode(self.gpu_devices, self.cdi_kind, gpus, facts)[0]

    def _static_mode(self) -> GpuRequestMode:
        if not self.gpu_passthrough:
            return "env"
        return self._gpu_mode or ("cdi" if self.gpu_devices == "cdi" else "nvidia")

    # -- container spec ------------------------------------------------------------

    def container_spec(
        self,
        exchange: ExchangeDir,
        gpu_ids: Sequence[str],
        *,
        config_hash: str,
        gpu_request: GpuRequestMode | None = None,
        cpu: CpuPlacement | None = None,
    ) -> dict[str, Any]:
        """The Engine API create body for one experiment (also shown by --dry-run).

        `cpu`: the cores it starts on (`CpusetCpus`), at low CPU weight while it prepares.
        """
        labels = {
            **self.labels,
            **_labels.base_labels(),
            _labels.LABEL_CONFIG_HASH: config_hash,
            _labels.LABEL_EXCHANGE_DIR: str(exchange.path),
        }
        mode = gpu_request or self._static_mode()
        env = self._container_env(exchange, gpu_ids, mode)
        env.update(thread_env(cpu, env))
        host_config = self._host_config(exchange, gpu_ids, mode)
        if cpu is not None:
            host_config.update(cpu_update(cpu))
        spec: dict[str, Any] = {
            "Image": self.image,
            "Env": [f"{k}={v}" for k, v in sorted(env.items())],
            "Labels": labels,
            "HostConfig": host_config,
            "AttachStdout": False,
            "AttachStderr": False,
            "Tty": False,
        }
        if self.function is not None:
            spec["Cmd"] = ["python3", HELPER_CONTAINER_PATH, self.function]
        elif exchange.gated:
            spec.update(gated_spec(self._image_config, self.command))
        elif self.command is not None:
            spec["Cmd"] = self.command
        user = self.container_user()
        if user is not None:
            spec["User"] = user
        return spec

    def _container_env(
        self, exchange: ExchangeDir, gpu_ids: Sequence[str], mode: GpuRequestMode
    ) -> dict[str, str]:
        env = {**self.env, **exchange.env(CONTAINER_EXCHANGE_DIR)}
        env["LLEM_GPU_IDS"] = ",".join(gpu_ids)
        if self.source_dir is not None:
            env["PYTHONPATH"] = ":".join(
                p for p in (SOURCE_CONTAINER_PATH, self.env.get("PYTHONPATH")) if p
            )
        env.update(visibility_env(mode, gpu_ids))
        return env

    def _host_config(
        self, exchange: ExchangeDir, gpu_ids: Sequence[str], mode: GpuRequestMode
    ) -> dict[str, Any]:
        mounts: list[dict[str, Any]] = [
            {
                "Type": "bind",
                "Source": str(exchange.path),
                "Target": CONTAINER_EXCHANGE_DIR,
                "ReadOnly": False,
            },
        ]
        if self.function is not None:
            mounts.append(
                {
                    "Type": "bind",
                    "Source": str(helper_script()),
                    "Target": HELPER_CONTAINER_PATH,
                    "ReadOnly": True,
                }
            )
        if self.source_dir is not None:
            mounts.append(
                {
                    "Type": "bind",
                    "Source": str(self.source_dir),
                    "Target": SOURCE_CONTAINER_PATH,
                    "ReadOnly": True,
                }
            )
        host_config: dict[str, Any] = {
            "Mounts": mounts,
            "ShmSize": self.shm_size,
            "SecurityOpt": ["no-new-privileges"],
            "CapDrop": ["ALL"],
            "Init": False,
            # We capture stdio ourselves (attach): the daemon need not log it too.
            "LogConfig": {"Type": self.log_driver, "Config": {}},
        }
        if self.cap_add:
            host_config["CapAdd"] = self.cap_add
        if self.network is not None:
            host_config["NetworkMode"] = self.network
        if self.mem_limit is not None:
            host_config["Memory"] = self.mem_limit
            host_config["MemorySwap"] = self.mem_limit
        requests = device_requests(mode, gpu_ids, self.cdi_kind)
        if requests:
            host_config["DeviceRequests"] = requests
        return host_config

    def container_user(self) -> str | None:
        """The 'uid:gid' the container runs as: `user`, else the caller's own when not root.

        Root in the container has no capabilities (all dropped), so it could not
        write into a non-root caller's 0700 exchange dir; the caller's ids can.
        """
        if self.user is not None:
            return self.user
        if os.geteuid() != 0:
            return f"{os.geteuid()}:{os.getegid()}"
        return None

    # -- run -----------------------------------------------------------------------

    @property
    def speaks_gate(self) -> bool:
        """Runs can be held at a gate: the helper waits (`function:`), or a shell gate
        in front of the image's own command (`command:` or its CMD; needs /bin/sh)."""
        return True

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Sequence[str] | None = None,
        observer: RunObserver | None = None,
        gate: Gate | None = None,
    ) -> Outcome:
        """Run one experiment; return its validated result or `ExperimentFailure`.

        Raises `DockerError` subclasses for infrastructure failures and `ResultError`
        for unusable result files. Cancelling the caller kills and removes the container.
        With `gate` (only when `speaks_gate`), the container starts held at its gate
        and is let go once `gate()` returns (prestart).
        """
        return await run_lifecycle(
            self, ContainerRun(self), config, gpus=gpus, observer=observer, gate=gate
        )

    def describe_launch(
        self, exchange: ExchangeDir, gpu_ids: Sequence[str], *, config_hash: str
    ) -> tuple[str, dict[str, Any]]:
        """For --dry-run: what it would ask its engine to create for one experiment."""
        body = self.container_spec(exchange, gpu_ids, config_hash=config_hash)
        return f"container spec of the first experiment ({self.engine}, create body):", body

    async def remove_container(self, container: Any, bound: Any, *, by: float = math.inf) -> None:
        """Force-remove the container; shielded from cancellation and bounded.

        If the daemon cannot be reached (restarting), the id is kept and removal is
        tried again before the next run and at `aclose()`, so nothing is left behind.
        """
        with anyio.CancelScope(shield=True):
            limit = min(anyio.current_time() + self.deadlines.delete, by)
            with anyio.CancelScope(deadline=limit) as scope:
                try:
                    await container.delete(force=True, v=True)
                    self.pending_removal.discard(container.id)
                    return
                except aiodocker.DockerError as exc:
                    if exc.status == 404:
                        self.pending_removal.discard(container.id)
                        return
                    bound.warning("container_remove_failed", error=str(exc))
                except (aiohttp.ClientError, OSError) as exc:
                    bound.warning("container_remove_failed", error=repr(exc))
            if scope.cancelled_caught:
                bound.warning("container_remove_timed_out")
            self.pending_removal.add(container.id)

    async def remove_pending(self) -> None:
        """Retry removals that failed while the engine was unreachable."""
        for container_id in list(self.pending_removal):
            container = self.client().containers.container(container_id)
            await self.remove_container(container, log.bind(container_id=container_id[:12]))
