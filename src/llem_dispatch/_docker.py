"""The Docker edge: where the daemon is, whether it answers, images, API error mapping.

Every other module asks here; aiodocker's and aiohttp's errors become
llem-dispatch's own classes here, once.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import anyio

from llem_dispatch.errors import (
    DockerError,
    DockerGPUAccessError,
    DockerImagePullError,
    DockerPermissionError,
    DockerUnavailableError,
    LlemError,
)

__all__ = [
    "DEFAULT_DOCKER_URL",
    "build_image",
    "docker_available",
    "docker_url",
    "image_missing_error",
    "image_present",
    "inspect_image",
    "missing_images",
    "translate_api_error",
]

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"


def docker_url() -> str:
    """The daemon address: DOCKER_HOST, else the standard local socket."""
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL


def docker_available(timeout: float = 3.0) -> bool:
    """Whether a Docker daemon answers on this host (a quick API ping)."""
    url = docker_url()
    if not url.startswith("unix://"):
        return (
            shutil.which("docker") is not None
            and subprocess.run(
                ["docker", "version"], capture_output=True, timeout=timeout, check=False
            ).returncode
            == 0
        )
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


async def inspect_image(docker: aiodocker.Docker, image: str) -> dict[str, Any] | None:
    """The image's inspect data, or None when it is not on the daemon."""
    try:
        info: dict[str, Any] = await docker.images.inspect(image)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise translate_api_error(exc, image=image, phase="image") from exc
    except Exception as exc:
        raise translate_api_error(exc, image=image, phase="image") from exc
    return info


async def missing_images(images: Iterable[str], *, url: str | None = None) -> list[str]:
    """Those of `images` that are not on the daemon (in the order given)."""
    missing = []
    docker = aiodocker.Docker(url=url or docker_url())
    try:
        for image in images:
            if await inspect_image(docker, image) is None:
                missing.append(image)
    finally:
        await docker.close()
    return missing


def image_present(image: str) -> bool:
    """Whether `image` is on the daemon (for callers outside an event loop)."""
    return not anyio.run(missing_images, [image])


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
        error = DockerError(f"Docker API error at {phase} (HTTP {status}): {message}", **context)
        error.transient = status >= 500
        return error
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
