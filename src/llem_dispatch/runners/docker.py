"""DockerRunner: one ephemeral container per experiment, through the Engine API (aiodocker).

Owns the container's whole life: create, start, follow logs, wait (bounded),
collect files, remove. aiodocker's and aiohttp's errors are translated to
llem-dispatch's own classes here, once.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import os
import re
import secrets as _secrets_mod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiodocker
import aiohttp
import anyio
import structlog
from pydantic import BaseModel

from llem_dispatch import _labels
from llem_dispatch._docker import (
    DEFAULT_DEADLINES,
    ApiDeadlines,
    bounded,
    docker_url,
    image_missing_error,
    inspect_image,
    translate_api_error,
)
from llem_dispatch._exchange import (
    CONTAINER_EXCHANGE_DIR,
    DEFAULT_MAX_RESULT_BYTES,
    ExchangeDir,
)
from llem_dispatch._logcapture import LogCapture
from llem_dispatch.errors import (
    DockerContainerError,
    DockerDaemonHungError,
    DockerError,
    DockerHangError,
    DockerOOMError,
    DockerTimeoutError,
    LlemError,
)
from llem_dispatch.runners._backend import (
    LOG_DRAIN_S,
    ErrorClasses,
    ExitStatus,
    Gate,
    Pump,
    Run,
    check_run_options,
    helper_script,
)
from llem_dispatch.runners._cancel import FORCE_KILL, wait_until_forced
from llem_dispatch.runners._gate import gated_spec
from llem_dispatch.runners._lifecycle import DEFAULT_SECRET_ENV, run_lifecycle
from llem_dispatch.runners.protocol import Outcome, RunObserver

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
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

log = structlog.get_logger("llem_dispatch.docker")

#: What a container run raises for what the shared lifecycle detects: the Docker
#: classes (llenergymeasure's contract), each a subclass of its neutral class.
DOCKER_ERRORS = ErrorClasses(
    timeout=DockerTimeoutError,
    hang=DockerHangError,
    oom=DockerOOMError,
    bad_exit=DockerContainerError,
    other=DockerError,
    slow_start=" (the Docker daemon is slow or stuck)",
)


def parse_size(value: int | str) -> int:
    """'8g' / '512m' / 1024 -> bytes (binary units, as `docker run --shm-size`)."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"cannot parse size {value!r}; use e.g. '8g', '512m' or bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


class DockerRunner:
    """Runs each experiment in its own ephemeral container on the local Docker Engine.

    Args:
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
        stop_grace_s: float = 10.0,
        log_driver: str = "none",
        source_dir: str | Path | None = None,
        api_deadlines: ApiDeadlines = DEFAULT_DEADLINES,
    ) -> None:
        if command is not None and function is not None:
            raise ValueError("give either command= or function=, not both")
        check_run_options(timeout=timeout, silence_timeout=silence_timeout, function=function)
        if not image or any(ch.isspace() for ch in image):
            raise ValueError(f"invalid image reference {image!r}")
        self.image = image
        self.timeout = timeout
        self.source = source
        self.result_model = result_model
        self.command = list(command) if command is not None else None
        self.function = function
        self.env = dict(env or {})
        for key in self.env:
            if key.upper() in {n.upper() for n in secret_env}:
                raise ValueError(
                    f"env {key} is a secret: it would be visible in docker "
                    "inspect; set it on the host instead (passed as a file)"
                )
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
        self._docker_host = docker_host
        self.stop_grace_s = stop_grace_s
        self.log_driver = log_driver
        self.source_dir = Path(source_dir).resolve() if source_dir is not None else None
        self.deadlines = api_deadlines
        self._docker: aiodocker.Docker | None = None
        self._digest: str | None = None
        self._image_config: dict[str, Any] | None = None
        self._pending_removal: set[str] = set()
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
        if self._pending_removal and self._docker is not None and not self._closed:
            # Only removals that already failed are pending: the daemon is down or
            # stuck, so a short try, then the ids are named for `reap`.
            with anyio.CancelScope(shield=True), anyio.move_on_after(PENDING_RETRY_S):
                await self._remove_pending()
        if self._pending_removal:
            log.warning(
                "containers_left_for_reap",
                containers=sorted(c[:12] for c in self._pending_removal),
                fix="The Docker daemon did not remove them; once it answers again, run "
                "`llem-dispatch reap` (their logs are kept).",
            )
        self._closed = True
        if self._docker is not None:
            docker, self._docker = self._docker, None
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await docker.close()

    def _client(self) -> aiodocker.Docker:
        if self._closed:
            raise RuntimeError("DockerRunner is closed")
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self._docker_host or docker_url())
        return self._docker

    # -- image -------------------------------------------------------------------

    async def image_digest(self) -> str:
        """The image's repo digest (or id when it has none); looked up once."""
        if self._digest is None:
            info = await inspect_image(self._client(), self.image, deadline=self.deadlines.image)
            if info is None:
                raise image_missing_error(self.image)
            repo_digests = info.get("RepoDigests") or []
            self._digest = str(repo_digests[0] if repo_digests else info["Id"])
            self._image_config = info.get("Config") or {}
        return self._digest

    # -- container spec ------------------------------------------------------------

    def container_spec(
        self, exchange: ExchangeDir, gpu_ids: Sequence[str], *, config_hash: str
    ) -> dict[str, Any]:
        """The Engine API create body for one experiment (also shown by --dry-run)."""
        labels = {
            **self.labels,
            **_labels.base_labels(),
            _labels.LABEL_CONFIG_HASH: config_hash,
            _labels.LABEL_EXCHANGE_DIR: str(exchange.path),
        }
        env = self._container_env(exchange, gpu_ids)
        spec: dict[str, Any] = {
            "Image": self.image,
            "Env": [f"{k}={v}" for k, v in sorted(env.items())],
            "Labels": labels,
            "HostConfig": self._host_config(exchange, gpu_ids),
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

    def _container_env(self, exchange: ExchangeDir, gpu_ids: Sequence[str]) -> dict[str, str]:
        env = {**self.env, **exchange.env(CONTAINER_EXCHANGE_DIR)}
        env["LLEM_GPU_IDS"] = ",".join(gpu_ids)
        if self.source_dir is not None:
            env["PYTHONPATH"] = ":".join(
                p for p in (SOURCE_CONTAINER_PATH, self.env.get("PYTHONPATH")) if p
            )
        if gpu_ids:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
            # Inside the container the runtime renumbers the devices from 0.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpu_ids)))
        else:
            # CUDA images default to NVIDIA_VISIBLE_DEVICES=all: never share by accident.
            env["NVIDIA_VISIBLE_DEVICES"] = "void"
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def _host_config(self, exchange: ExchangeDir, gpu_ids: Sequence[str]) -> dict[str, Any]:
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
        if gpu_ids and self.gpu_passthrough:
            host_config["DeviceRequests"] = [
                {"Driver": "nvidia", "DeviceIDs": list(gpu_ids), "Capabilities": [["gpu"]]}
            ]
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
            self, _ContainerRun(self), config, gpus=gpus, observer=observer, gate=gate
        )

    async def _remove(self, container: Any, bound: Any, *, by: float = math.inf) -> None:
        """Force-remove the container; shielded from cancellation and bounded.

        If the daemon cannot be reached (restarting), the id is kept and removal is
        tried again before the next run and at `aclose()`, so nothing is left behind.
        """
        with anyio.CancelScope(shield=True):
            limit = min(anyio.current_time() + self.deadlines.delete, by)
            with anyio.CancelScope(deadline=limit) as scope:
                try:
                    await container.delete(force=True, v=True)
                    self._pending_removal.discard(container.id)
                    return
                except aiodocker.DockerError as exc:
                    if exc.status == 404:
                        self._pending_removal.discard(container.id)
                        return
                    bound.warning("container_remove_failed", error=str(exc))
                except (aiohttp.ClientError, OSError) as exc:
                    bound.warning("container_remove_failed", error=repr(exc))
            if scope.cancelled_caught:
                bound.warning("container_remove_timed_out")
            self._pending_removal.add(container.id)

    async def _remove_pending(self) -> None:
        """Retry removals that failed while the daemon was unreachable."""
        for container_id in list(self._pending_removal):
            container = self._client().containers.container(container_id)
            await self._remove(container, log.bind(container_id=container_id[:12]))


class _ContainerRun:
    """One run's container: the `RunBackend` that `run_lifecycle` drives for DockerRunner."""

    noun = "container"
    errors = DOCKER_ERRORS

    def __init__(self, runner: DockerRunner) -> None:
        self.runner = runner
        self.log = log.bind(image=runner.image)
        self.image_digest: str | None = None
        self.container: Any = None
        self.stream: Any = None

    def exchange_root(self, exchange: ExchangeDir) -> str:
        return CONTAINER_EXCHANGE_DIR

    async def prepare(self) -> None:
        if self.runner._pending_removal:
            await self.runner._remove_pending()
        self.image_digest = await self.runner.image_digest()

    async def start(self, run: Run) -> None:
        """Create, attach, start; every Docker error translated with the run's context."""
        runner, exchange = self.runner, run.exchange
        if runner.user is not None and os.geteuid() == 0:
            uid, _, gid = runner.user.partition(":")
            if uid.isdigit():
                exchange.chown(int(uid), int(gid) if gid.isdigit() else int(uid))
        spec = runner.container_spec(exchange, run.info.gpu_ids, config_hash=exchange.config_hash)
        name = f"llem-{exchange.config_hash}-{_secrets_mod.token_hex(3)}"

        async def create() -> Any:
            return await runner._client().containers.create(spec, name=name)

        # Shielded: a create cancelled mid-request can still make a container whose
        # id we would never learn. Let it finish (bounded), then clean up; one that
        # hangs is removed by name later, if the daemon ever makes it.
        try:
            with anyio.CancelScope(shield=True):
                self.container = await self._call("create", run, create)
        except DockerDaemonHungError:
            runner._pending_removal.add(name)
            raise
        run.info.container_id = self.container.id
        run.context["container_id"] = self.container.id
        run.bind(container_id=self.container.id[:12])
        # Attach before start: the raw stdio stream misses nothing (the logs endpoint
        # with follow=True drops a last line without newline) and, with the "none" log
        # driver, costs the daemon no JSON encoding per line.
        self.stream = await self._call("attach", run, self._attach)
        await self._call("start", run, self.container.start)

    async def _attach(self) -> Any:
        stream = self.container.attach(stdout=True, stderr=True)
        await stream.__aenter__()
        return stream

    async def _call(self, phase: str, run: Run, call: Callable[[], Awaitable[Any]]) -> Any:
        """One API call of this run, under its deadline (`DockerDaemonHungError` past it)."""
        return await bounded(
            phase, self.runner.deadlines.of(phase), call, image=self.runner.image, **run.context
        )

    def pumps(self, capture: LogCapture) -> Sequence[Pump]:
        return [lambda: _pump(self.stream, capture)]

    async def wait(self, run: Run) -> None:
        """Until the container exits; a bounded inspect every `liveness_every` s meanwhile.

        The wait itself may last as long as the experiment: a daemon that hangs
        meanwhile is caught by the inspects, which then pass their deadline. Errors
        leave the task group unwrapped, as the `LlemError` they are.
        """
        errors: list[LlemError] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._prove_alive, run, errors, tg.cancel_scope)
            try:
                await self.container.wait()
            except Exception as exc:  # noqa: BLE001 - translated, then raised below
                errors.append(
                    translate_api_error(exc, image=self.runner.image, phase="wait", **run.context)
                )
            tg.cancel_scope.cancel()
        if errors:
            raise errors[0]

    async def _prove_alive(
        self, run: Run, errors: list[LlemError], scope: anyio.CancelScope
    ) -> None:
        try:
            while True:
                await anyio.sleep(self.runner.deadlines.liveness_every)
                await self._call("inspect", run, self.container.show)
        except LlemError as exc:
            errors.append(exc)
            scope.cancel()

    async def kill(self, run: Run) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.runner.deadlines.kill):
            try:
                await self.container.kill(signal="SIGKILL")
                return
            except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
                run.bound.debug("kill_failed", error=repr(exc))
                return
        run.bound.warning("kill_timed_out", deadline_s=self.runner.deadlines.kill)

    async def exited(self, run: Run) -> ExitStatus:
        state = (await self._call("inspect", run, self.container.show))["State"]
        code = int(state.get("ExitCode", -1))
        oom_killed = bool(state.get("OOMKilled"))
        oom = None
        if oom_killed or code == 137:
            oom = "container was killed by the OOM killer" + (
                " (State.OOMKilled)" if oom_killed else " (exit 137, not by us)"
            )
        return ExitStatus(code=code, oom=oom, log_fields={"oom_killed": oom_killed})

    async def stop(self, run: Run) -> None:
        """SIGTERM, SIGKILL after the grace period (at once if forced)."""
        if self.container is None:
            return
        grace = 0 if FORCE_KILL.is_set() else self.runner.stop_grace_s
        limit = min(anyio.current_time() + grace + self.runner.deadlines.stop, run.cleanup_deadline)
        with anyio.CancelScope(shield=True, deadline=limit):
            try:
                if grace > 0:
                    run.bound.info("container_stopping", grace_s=grace)
                    # Docker sends SIGTERM, then SIGKILL once `t` seconds have passed.
                    with anyio.move_on_after(grace + 5):
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._kill_when_forced, tg.cancel_scope)
                            await self.container.stop(t=math.ceil(grace))
                            tg.cancel_scope.cancel()
                else:
                    await self.container.kill(signal="SIGKILL")
            except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
                run.bound.debug("stop_failed", error=repr(exc))

    async def _kill_when_forced(self, scope: anyio.CancelScope) -> None:
        await wait_until_forced()
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError):
            await self.container.kill(signal="SIGKILL")
        scope.cancel()

    async def cleanup(self, run: Run) -> None:
        """Close the attached stream, then force-remove the container."""
        if self.stream is not None:
            limit = min(anyio.current_time() + 5, run.cleanup_deadline)
            with anyio.CancelScope(shield=True, deadline=limit), contextlib.suppress(Exception):
                await self.stream.close()
        if self.container is not None:
            await self.runner._remove(self.container, run.bound, by=run.cleanup_deadline)


async def _pump(stream: Any, capture: LogCapture) -> None:
    """Copy the attached stdout/stderr frames into the capture until EOF."""
    decoders = {
        1: codecs.getincrementaldecoder("utf-8")(errors="replace"),
        2: codecs.getincrementaldecoder("utf-8")(errors="replace"),
    }
    try:
        while True:
            message = await stream.read_out()
            if message is None:
                break
            fileno = 2 if message.stream == 2 else 1
            capture.feed(
                "stderr" if fileno == 2 else "stdout", decoders[fileno].decode(message.data)
            )
    except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
        log.debug("attach_stream_ended", error=repr(exc))
