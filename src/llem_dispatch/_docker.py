"""The Docker edge: where the daemon is, whether it answers, what it runs, images, API errors.

Every other module asks here; aiodocker's and aiohttp's errors become
llem-dispatch's own classes here, once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
import aiohttp
import anyio

from llem_dispatch._deadlines import DEFAULT_DEADLINES, ApiDeadlines
from llem_dispatch._labels import LABEL_PROBE, base_labels
from llem_dispatch.errors import (
    DockerContainerError,
    DockerDaemonHungError,
    DockerError,
    DockerGPUAccessError,
    DockerImagePullError,
    DockerPermissionError,
    DockerTimeoutError,
    DockerUnavailableError,
    LlemError,
)

__all__ = [
    "DEFAULT_DEADLINES",
    "DEFAULT_DOCKER_URL",
    "ApiDeadlines",
    "bounded",
    "build_image",
    "docker_available",
    "docker_url",
    "engine_info",
    "engine_version",
    "hung_error",
    "image_missing_error",
    "image_present",
    "inspect_image",
    "missing_images",
    "run_once",
    "run_probe",
    "runtimes",
    "translate_api_error",
    "version_info",
]

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
#: Bound on one question to the daemon (version, info): a wedged daemon must not hang us.
QUERY_TIMEOUT_S = 15.0
#: Bound on a whole probe run: create, start, wait for `true`, read its stderr.
PROBE_TIMEOUT_S = 60.0
#: Bound on removing a container and on closing a client, even when cancelled.
_CLEANUP_TIMEOUT_S = 10.0

_T = TypeVar("_T")


def docker_url() -> str:
    """The daemon address: DOCKER_HOST, else the standard local socket."""
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL


def docker_available(timeout: float = 3.0, *, url: str | None = None) -> bool:
    """Whether a Docker daemon (or the engine at `url`) answers here (a quick API ping)."""
    url = url or docker_url()
    if not url.startswith("unix://"):
        # Another transport (tcp, ssh): the docker CLI asks that engine, not its default.
        if shutil.which("docker") is None:
            return False
        try:
            done = subprocess.run(
                ["docker", "--host", url, "version"],
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except (subprocess.TimeoutExpired, OSError):
            return False
        return done.returncode == 0
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(url.removeprefix("unix://"))
        sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        return b"200 OK" in sock.recv(256)
    except OSError:
        return False
    finally:
        sock.close()


def hung_error(call: str, deadline: float, **context: Any) -> DockerDaemonHungError:
    """The error for a call that passed its deadline, naming the call and the container."""
    container = context.get("container_id")
    what = f" of container {str(container)[:12]}" if container else ""
    return DockerDaemonHungError(
        f"the Docker daemon did not answer `{call}`{what} within {deadline:g}s: "
        "it is stuck (it may still answer `docker version` and `docker ps`)",
        **context,
    )


async def bounded(
    call: str,
    deadline: float,
    fn: Callable[[], Awaitable[_T]],
    *,
    image: str = "-",
    **context: Any,
) -> _T:
    """Await one API call under its deadline; errors translated, a hang named."""
    try:
        with anyio.fail_after(deadline):
            return await fn()
    except TimeoutError as exc:
        raise hung_error(call, deadline, **context) from exc
    except Exception as exc:
        raise translate_api_error(exc, image=image, phase=call, **context) from exc


async def inspect_image(
    docker: aiodocker.Docker, image: str, *, deadline: float = DEFAULT_DEADLINES.image
) -> dict[str, Any] | None:
    """The image's inspect data, or None when it is not on the daemon (bounded)."""
    try:
        with anyio.fail_after(deadline):
            info: dict[str, Any] = await docker.images.inspect(image)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise translate_api_error(exc, image=image, phase="image") from exc
    except TimeoutError as exc:
        raise hung_error("image inspect", deadline) from exc
    except Exception as exc:
        raise translate_api_error(exc, image=image, phase="image") from exc
    return info


@contextlib.asynccontextmanager
async def _client(url: str | None) -> AsyncIterator[aiodocker.Docker]:
    """An Engine API client for one errand, closed on the way out (bounded, shielded)."""
    docker = aiodocker.Docker(url=url or docker_url())
    try:
        yield docker
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLEANUP_TIMEOUT_S):
            await docker.close()


async def _query(
    ask: Callable[[aiodocker.Docker], Awaitable[_T]], *, phase: str, url: str | None
) -> _T:
    """One question to the daemon, bounded by QUERY_TIMEOUT_S, its errors translated."""
    async with _client(url) as docker:
        try:
            with anyio.fail_after(QUERY_TIMEOUT_S):
                return await ask(docker)
        except TimeoutError as exc:
            raise hung_error(phase, QUERY_TIMEOUT_S) from exc
        except Exception as exc:
            raise translate_api_error(exc, image="-", phase=phase) from exc


async def engine_version(*, url: str | None = None) -> tuple[str, str]:
    """The daemon's server version and Engine API version, e.g. ("24.0.7", "1.43")."""
    info = await _query(lambda docker: docker.version(), phase="version", url=url)
    return str(info.get("Version", "")), str(info.get("ApiVersion", ""))


async def engine_info(*, url: str | None = None) -> dict[str, Any]:
    """The engine's `/info` (CDISpecDirs, Runtimes, ...), bounded like every query."""
    return dict(await _query(lambda docker: docker.system.info(), phase="info", url=url))


async def version_info(*, url: str | None = None) -> dict[str, Any]:
    """The engine's `/version` whole: Version, ApiVersion and its Components (Podman's)."""
    return dict(await _query(lambda docker: docker.version(), phase="version", url=url))


async def runtimes(*, url: str | None = None) -> list[str]:
    """Names of the daemon's registered OCI runtimes (`nvidia` once the toolkit is set up)."""
    info = await _query(lambda docker: docker.system.info(), phase="info", url=url)
    return sorted(info.get("Runtimes") or {})


async def missing_images(images: Iterable[str], *, url: str | None = None) -> list[str]:
    """Those of `images` that are not on the daemon (in the order given)."""
    missing = []
    async with _client(url) as docker:
        for image in images:
            if await inspect_image(docker, image) is None:
                missing.append(image)
    return missing


def image_present(image: str) -> bool:
    """Whether `image` is on the daemon (for callers outside an event loop)."""
    return not anyio.run(missing_images, [image])


async def run_probe(image: str, *, url: str | None = None) -> None:
    """Run `true` in a throwaway container of `image`: create, start, wait, remove.

    The container has no network and carries llem.managed=1 with its owner's
    labels (so `reap` removes one a killed process left) and llem.probe=1.
    Raises `DockerTimeoutError` when it has not exited within PROBE_TIMEOUT_S,
    `DockerContainerError` (with its stderr tail) when it exits non-zero, and the
    translated API error when the daemon refuses a step.
    """
    exit_code, stderr, container_id = await run_once(image, ["true"], url=url)
    if exit_code != 0:
        raise DockerContainerError(
            f"the probe container of {image} exited with {exit_code}",
            stderr=stderr,
            container_id=container_id,
            exit_code=exit_code,
        )


async def run_once(
    image: str,
    cmd: list[str],
    *,
    mounts: list[dict[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
    url: str | None = None,
) -> tuple[int, str, str]:
    """Run `cmd` in a throwaway, network-less container; (exit code, stderr, container id).

    Bounded by PROBE_TIMEOUT_S (`DockerTimeoutError`); the container is removed
    whatever happens, and carries the owner's labels for `reap` and llem.probe=1.
    """
    body: dict[str, Any] = {
        "Image": image,
        "Cmd": cmd,
        "Env": [f"{k}={v}" for k, v in (env or {}).items()],
        "Labels": {**base_labels(), LABEL_PROBE: "1"},
        "HostConfig": {"NetworkMode": "none", "Mounts": mounts or []},
    }
    phase = "create"
    async with _client(url) as docker:
        container: aiodocker.containers.DockerContainer | None = None
        try:
            with anyio.fail_after(PROBE_TIMEOUT_S):
                container = await docker.containers.create(body)
                phase = "start"
                await container.start()
                phase = "wait"
                exit_code = int((await container.wait()).get("StatusCode", -1))
                phase = "logs"
                stderr = "" if exit_code == 0 else "".join(await container.log(stderr=True))
                return exit_code, stderr, container.id
        except TimeoutError as exc:
            raise DockerTimeoutError(
                f"the probe container of {image} did not finish within {PROBE_TIMEOUT_S:g}s "
                f"(stuck at {phase})",
                fix_suggestion="Check `docker info` and the daemon's log; the daemon is slow "
                "or stuck creating containers.",
            ) from exc
        except Exception as exc:
            raise translate_api_error(exc, image=image, phase=phase) from exc
        finally:
            if container is not None:
                await _remove_quietly(container)


async def _remove_quietly(container: aiodocker.containers.DockerContainer) -> None:
    """Force-remove a container we created; bounded and shielded, a failure only logged away."""
    with (
        anyio.CancelScope(shield=True),
        anyio.move_on_after(_CLEANUP_TIMEOUT_S),
        contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError),
    ):
        await container.delete(force=True)


def build_image(
    image: str,
    *,
    context: Path,
    dockerfile: str | None = None,
    args: Mapping[str, str] | None = None,
    output: Callable[[str], None] = print,
) -> None:
    """`docker build -t IMAGE CONTEXT`, streaming its output; `DockerImagePullError` on failure."""
    cmd = ["docker", "build", "-t", image]
    if dockerfile:
        cmd += ["-f", str(context / dockerfile)]
    for key, value in (args or {}).items():
        cmd += ["--build-arg", f"{key}={value}"]
    cmd.append(str(context))
    output(f"building {image} from {context} ...")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            output("  " + line.rstrip())
            tail = [*tail[-19:], line.rstrip()]
    if proc.returncode != 0:
        raise DockerImagePullError(
            f"building {image} from {context} failed (exit {proc.returncode})",
            fix_suggestion="Fix the Dockerfile or its base image (set build args such as "
            "BASE_IMAGE to an image present locally); the build output is above.",
            stderr_snippet="\n".join(tail),
        )


def image_missing_error(
    image: str, detail: str | None = None, **context: Any
) -> DockerImagePullError:
    """The error for an image that is not on the daemon, with how to get it there."""
    detail = detail or f"No such image: {image}"
    return DockerImagePullError(
        f"image {image!r} is not present on the Docker host ({detail})",
        fix_suggestion=f"Build it (`docker build -t {image} .`, or give the study a "
        f"`build:` context) or pull it (`docker pull {image}`) on a host that can "
        "reach its registry.",
        **context,
    )


def translate_api_error(exc: BaseException, *, image: str, phase: str, **context: Any) -> LlemError:
    """Map an aiodocker/aiohttp exception to our most specific class."""
    if isinstance(exc, LlemError):
        return exc
    if isinstance(exc, aiodocker.DockerError) and exc.status == 900:
        # aiodocker's wrapper for "could not connect"; the OS error is in the chain.
        return _connection_error(exc, phase, context)
    if isinstance(exc, aiodocker.DockerError):
        status, message = exc.status, str(exc.message)
        if status == 404 and ("no such image" in message.lower() or phase in {"create", "image"}):
            return image_missing_error(image, message, **context)
        if "could not select device driver" in message or "nvidia-container" in message:
            return DockerGPUAccessError(
                f"the daemon cannot give GPUs to containers: {message}", **context
            )
        return DockerError(
            f"Docker API error at {phase} (HTTP {status}): {message}",
            transient=status >= 500,
            **context,
        )
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ClientOSError | OSError):
        return _connection_error(exc, phase, context)
    if isinstance(exc, aiohttp.ClientError | ConnectionError):
        return DockerUnavailableError(
            f"Docker daemon unavailable: connection lost during {phase} ({exc!r})", **context
        )
    return DockerError(f"unexpected error during {phase}: {exc!r}", **context)


def _connection_error(exc: BaseException, phase: str, context: dict[str, Any]) -> LlemError:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = getattr(current, "os_error", None) or current.__cause__
    if (
        any(isinstance(e, PermissionError) for e in chain)
        or "permission denied" in str(exc).lower()
    ):
        return DockerPermissionError(f"permission denied on the Docker socket ({exc})", **context)
    return DockerUnavailableError(
        f"Docker daemon unavailable at {docker_url()} during {phase}: {exc}", **context
    )
