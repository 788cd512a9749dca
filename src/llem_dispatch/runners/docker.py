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
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiodocker
import aiohttp
import anyio
import structlog
from pydantic import BaseModel

from llem_dispatch import _labels
from llem_dispatch._docker import docker_url, translate_api_error
from llem_dispatch._exchange import (
    CONTAINER_EXCHANGE_DIR,
    DEFAULT_MAX_RESULT_BYTES,
    ExchangeDir,
)
from llem_dispatch._logcapture import LogCapture
from llem_dispatch.errors import (
    DockerError,
    DockerOOMError,
    LlemError,
)
from llem_dispatch.models import (
    ExperimentFailure,
    RunnerMetadata,
    compute_config_hash,
    config_to_dict,
)
from llem_dispatch.runners._lifecycle import (
    DEFAULT_SECRET_ENV,
    FORCE_KILL,
    check_run_options,
    collect_outcome,
    collect_secrets,
    killed_error,
    wait_bounded,
    wait_until_forced,
)
from llem_dispatch.runners.protocol import Outcome, RunInfo, RunObserver, utcnow

__all__ = ["HELPER_CONTAINER_PATH", "DockerRunner", "parse_size"]


HELPER_CONTAINER_PATH = "/opt/llem/llem_container.py"
KILL_WAIT_S = 15.0
CLEANUP_TIMEOUT_S = 20.0
LOG_DRAIN_S = 5.0
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

log = structlog.get_logger("llem_dispatch.docker")


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


def _helper_source() -> Path:
    return Path(str(resources.files("llem_dispatch") / "container.py"))


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
        user: 'uid:gid' to run as; cap_add: capabilities kept (all others dropped).
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
        self._docker: aiodocker.Docker | None = None
        self._digest: str | None = None
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
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
                await self._remove_pending()
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
            try:
                info = await self._client().images.inspect(self.image)
            except Exception as exc:
                raise translate_api_error(exc, image=self.image, phase="image") from exc
            repo_digests = info.get("RepoDigests") or []
            self._digest = str(repo_digests[0] if repo_digests else info["Id"])
        return self._digest

    # -- container spec ------------------------------------------------------------

    def container_spec(
        self, exchange: ExchangeDir, gpu_ids: Sequence[str], *, config_hash: str
    ) -> dict[str, Any]:
        """The Engine API create body for one experiment (also shown by --dry-run)."""
        env = {**self.env, **exchange.env(CONTAINER_EXCHANGE_DIR)}
        env["LLEM_GPU_IDS"] = ",".join(gpu_ids)
        if gpu_ids:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
            # Inside the container the runtime renumbers the devices from 0.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpu_ids)))
        else:
            # CUDA images default to NVIDIA_VISIBLE_DEVICES=all: never share by accident.
            env["NVIDIA_VISIBLE_DEVICES"] = "void"
            env["CUDA_VISIBLE_DEVICES"] = ""
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
                    "Source": str(_helper_source()),
                    "Target": HELPER_CONTAINER_PATH,
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
        labels = {
            **self.labels,
            **_labels.base_labels(),
            _labels.LABEL_CONFIG_HASH: config_hash,
            _labels.LABEL_EXCHANGE_DIR: str(exchange.path),
        }
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
        elif self.command is not None:
            spec["Cmd"] = self.command
        if self.user is not None:
            spec["User"] = self.user
        return spec

    # -- run -----------------------------------------------------------------------

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Sequence[str] | None = None,
        observer: RunObserver | None = None,
    ) -> Outcome:
        """Run one experiment; return its validated result or `ExperimentFailure`.

        Raises `DockerError` subclasses for infrastructure failures and `ResultError`
        for unusable result files. Cancelling the caller kills and removes the container.
        """
        data = config_to_dict(config)
        config_hash = compute_config_hash(data)
        gpu_ids = tuple(str(g) for g in gpus or ())
        if self._pending_removal:
            await self._remove_pending()
        digest = await self.image_digest()
        exchange = ExchangeDir.create(config_hash, base_dir=self.exchange_base)
        info = RunInfo(
            config_hash=config_hash,
            gpu_ids=gpu_ids,
            exchange_dir=str(exchange.path),
            log_path=str(exchange.log_path),
            runner_type=self.runner_type,
            image=self.image,
            image_digest=digest,
        )
        bound = log.bind(config_hash=config_hash, image=self.image, gpus=list(gpu_ids))
        context: dict[str, Any] = {
            "config_hash": config_hash,
            "exchange_dir": exchange.path,
            "log_path": exchange.log_path,
        }
        container: Any = None
        capture: LogCapture | None = None
        succeeded = False
        try:
            exchange.write_config(data)
            exchange.write_secrets(collect_secrets(self.secret_env))
            if self.user is not None and os.geteuid() == 0:
                uid, _, gid = self.user.partition(":")
                if uid.isdigit():
                    exchange.chown(int(uid), int(gid) if gid.isdigit() else int(uid))
            spec = self.container_spec(exchange, gpu_ids, config_hash=config_hash)
            name = f"llem-{config_hash}-{_secrets_mod.token_hex(3)}"
            try:
                # Shielded: a create cancelled mid-request can still make a container
                # whose id we would never learn. Let it finish (bounded), then clean up.
                with anyio.CancelScope(shield=True), anyio.fail_after(CLEANUP_TIMEOUT_S):
                    container = await self._client().containers.create(spec, name=name)
            except Exception as exc:
                raise translate_api_error(exc, image=self.image, phase="create", **context) from exc
            info.container_id = container.id
            context["container_id"] = container.id
            bound = bound.bind(container_id=container.id[:12])
            capture = LogCapture(exchange.log_path)
            outcome = await self._supervise(container, capture, info, observer, context, bound)
            if isinstance(outcome, LlemError):
                raise outcome
            metadata = RunnerMetadata(
                runner_type=self.runner_type,
                runner_image=self.image,
                image_digest=info.image_digest,
                runner_source=self.source,
                container_id=info.container_id,
                gpu_ids=list(info.gpu_ids),
                exit_code=info.exit_code,
            )
            result = collect_outcome(
                data,
                exchange,
                info,
                metadata,
                self.result_model,
                context,
                bound,
                max_result_bytes=self.max_result_bytes,
                location=CONTAINER_EXCHANGE_DIR,
            )
            succeeded = not isinstance(result, ExperimentFailure)
            return result
        except BaseException as exc:
            succeeded = False
            cancelled = isinstance(exc, anyio.get_cancelled_exc_class() | KeyboardInterrupt)
            if isinstance(exc, LlemError) or cancelled:
                bound.warning(
                    "run_failed", error=type(exc).__name__, exchange_dir=str(exchange.path)
                )
            if cancelled and container is not None:
                await self._stop(container, bound)
            raise
        finally:
            exchange.remove_secrets()
            if capture is not None:
                capture.close()
            if container is not None:
                await self._remove(container, bound)
            if succeeded:
                exchange.remove()

    async def _supervise(
        self,
        container: Any,
        capture: LogCapture,
        info: RunInfo,
        observer: RunObserver | None,
        context: dict[str, Any],
        bound: Any,
    ) -> dict[str, Any] | LlemError:
        """Attach, start, wait with timeout and silence watchdog; return the State."""
        # Attach before start: the raw stdio stream misses nothing (the logs endpoint
        # with follow=True drops a last line without newline) and, with the "none" log
        # driver, costs the daemon no JSON encoding per line.
        try:
            stream = container.attach(stdout=True, stderr=True)
            await stream.__aenter__()
        except Exception as exc:
            raise translate_api_error(exc, image=self.image, phase="attach", **context) from exc
        try:
            return await self._run_attached(
                container, stream, capture, info, observer, context, bound
            )
        finally:
            with (
                anyio.CancelScope(shield=True),
                anyio.move_on_after(5),
                contextlib.suppress(Exception),
            ):
                await stream.close()

    async def _run_attached(
        self,
        container: Any,
        stream: Any,
        capture: LogCapture,
        info: RunInfo,
        observer: RunObserver | None,
        context: dict[str, Any],
        bound: Any,
    ) -> dict[str, Any] | LlemError:
        try:
            await container.start()
        except Exception as exc:
            raise translate_api_error(exc, image=self.image, phase="start", **context) from exc
        info.started_at = utcnow()
        capture.touch()
        bound.info("container_started")
        if observer is not None:
            observer.on_started(info)
        drained = anyio.Event()
        async with anyio.create_task_group() as followers:
            followers.start_soon(self._pump, stream, capture, drained)
            killed_for = await wait_bounded(
                lambda: self._wait(container, context),
                capture,
                timeout_s=self.timeout,
                silence_s=self.silence_timeout,
            )
            if killed_for is not None:
                bound.warning("container_killed", reason=killed_for)
                await self._kill(container)
                try:
                    with anyio.fail_after(KILL_WAIT_S):
                        await container.wait()
                except TimeoutError as exc:
                    raise DockerError(
                        f"container did not exit within {KILL_WAIT_S}s of SIGKILL", **context
                    ) from exc
            info.exited_at = utcnow()
            if observer is not None:
                observer.on_exited(info)
            # The attached stream ends by itself once the container has exited.
            with anyio.move_on_after(LOG_DRAIN_S):
                await drained.wait()
            followers.cancel_scope.cancel()
        try:
            state = (await container.show())["State"]
        except Exception as exc:
            raise translate_api_error(exc, image=self.image, phase="inspect", **context) from exc
        info.exit_code = int(state.get("ExitCode", -1))
        context["exit_code"] = info.exit_code
        context["stderr_snippet"] = capture.tail("stderr") or capture.tail("stdout")
        bound.info(
            "container_exited", exit_code=info.exit_code, oom_killed=bool(state.get("OOMKilled"))
        )
        killed = killed_error(
            killed_for,
            timeout=self.timeout,
            silence_timeout=self.silence_timeout,
            context=context,
        )
        if killed is not None:
            return killed
        if state.get("OOMKilled") or info.exit_code == 137:
            return DockerOOMError(
                "container was killed by the OOM killer"
                + (" (State.OOMKilled)" if state.get("OOMKilled") else " (exit 137, not by us)"),
                **context,
            )
        return dict(state)

    async def _wait(self, container: Any, context: dict[str, Any]) -> None:
        try:
            await container.wait()
        except Exception as exc:
            raise translate_api_error(exc, image=self.image, phase="wait", **context) from exc

    @staticmethod
    async def _pump(stream: Any, capture: LogCapture, done: anyio.Event) -> None:
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
        finally:
            done.set()

    async def _stop(self, container: Any, bound: Any) -> None:
        """On cancellation: SIGTERM, SIGKILL after the grace period (at once if forced)."""
        grace = 0 if FORCE_KILL.is_set() else self.stop_grace_s
        with anyio.CancelScope(shield=True), anyio.move_on_after(grace + CLEANUP_TIMEOUT_S):
            try:
                if grace > 0:
                    bound.info("container_stopping", grace_s=grace)
                    # Docker sends SIGTERM, then SIGKILL once `t` seconds have passed.
                    with anyio.move_on_after(grace + 5):
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._kill_when_forced, container, tg.cancel_scope)
                            await container.stop(t=math.ceil(grace))
                            tg.cancel_scope.cancel()
                else:
                    await container.kill(signal="SIGKILL")
            except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
                bound.debug("stop_failed", error=repr(exc))

    @staticmethod
    async def _kill_when_forced(container: Any, scope: anyio.CancelScope) -> None:
        await wait_until_forced()
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError):
            await container.kill(signal="SIGKILL")
        scope.cancel()

    async def _kill(self, container: Any) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLEANUP_TIMEOUT_S):
            try:
                await container.kill(signal="SIGKILL")
            except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
                log.debug("kill_failed", error=repr(exc))

    async def _remove(self, container: Any, bound: Any) -> None:
        """Force-remove the container; shielded from cancellation and bounded.

        If the daemon cannot be reached (restarting), the id is kept and removal is
        tried again before the next run and at `aclose()`, so nothing is left behind.
        """
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(CLEANUP_TIMEOUT_S) as scope:
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
