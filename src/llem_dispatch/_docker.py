"""The Docker edge: where the daemon is, whether it answers, what it runs, images, API errors.

Every other module asks here; aiodocker's and aiohttp's errors become
llem-dispatch's own classes here, once: the engine's own (`PodmanTimeoutError` on
Podman, each below its Docker class), chosen by `DockerError.for_engine`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shutil
import socket
import subprocess
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
import aiohttp
import anyio

from llem_dispatch._deadlines import DEFAULT_DEADLINES, ApiDeadlines
from llem_dispatch._engine import DEFAULT_DOCKER_URL, ContainerEngine, docker_engine, docker_url
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
    "ContainerEngine",
    "bounded",
    "build_image",
    "docker_available",
    "docker_engine",
    "docker_url",
    "engine_info",
    "engine_version",
    "engine_version_of",
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

#: Bound on one question to the daemon (version, info): a wedged daemon must not hang us.
QUERY_TIMEOUT_S = 15.0
#: Bound on a whole probe run: create, start, wait for `true`, read its stderr.
PROBE_TIMEOUT_S = 60.0
#: Bound on removing a container and on closing a client, even when cancelled.
_CLEANUP_TIMEOUT_S = 10.0

_T = TypeVar("_T")


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


def hung_error(
    call: str, deadline: float, *, engine: ContainerEngine | None = None, **context: Any
) -> DockerDaemonHungError:
    """The error for a call that passed its deadline, naming the call, engine and container."""
    engine = engine or docker_engine()
    container = context.get("container_id")
    what = f" of container {str(container)[:12]}" if container else ""
    return DockerDaemonHungError.for_engine(engine.name)(
        f"{engine} did not answer `{call}`{what} within {deadline:g}s: "
        "it is stuck (it may still answer `version` and `ps`)",
        **context,
    )


async def bounded(
    call: str,
    deadline: float,
    fn: Callable[[], Awaitable[_T]],
    *,
    image: str = "-",
    engine: ContainerEngine | None = None,
    **context: Any,
) -> _T:
    """Await one API call under its deadline; errors translated, a hang named."""
    try:
        with anyio.fail_after(deadline):
            return await fn()
    except TimeoutError as exc:
        raise hung_error(call, deadline, engine=engine, **context) from exc
    except Exception as exc:
        raise translate_api_error(exc, image=image, phase=call, engine=engine, **context) from exc


async def inspect_image(
    docker: aiodocker.Docker,
    image: str,
    *,
    deadline: float = DEFAULT_DEADLINES.image,
    engine: ContainerEngine | None = None,
) -> dict[str, Any] | None:
    """The image's inspect data, or None when it is not on the engine (bounded)."""
    try:
        with anyio.fail_after(deadline):
            info: dict[str, Any] = await docker.images.inspect(image)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise translate_api_error(exc, image=image, phase="image", engine=engine) from exc
    except TimeoutError as exc:
        raise hung_error("image inspect", deadline, engine=engine) from exc
    except Exception as exc:
        raise translate_api_error(exc, image=image, phase="image", engine=engine) from exc
    return info


def _engine(url: str | None, engine: ContainerEngine | None) -> ContainerEngine:
    """The engine asked: `engine`, else Docker at `url` (default DOCKER_HOST)."""
    return engine if engine is not None else docker_engine(url)


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
    ask: Callable[[aiodocker.Docker], Awaitable[_T]],
    *,
    phase: str,
    url: str | None,
    engine: ContainerEngine | None = None,
) -> _T:
    """One question to the engine, bounded by QUERY_TIMEOUT_S, its errors translated."""
    asked = _engine(url, engine)
    async with _client(asked.url) as docker:
        try:
            with anyio.fail_after(QUERY_TIMEOUT_S):
                return await ask(docker)
        except TimeoutError as exc:
            raise hung_error(phase, QUERY_TIMEOUT_S, engine=asked) from exc
        except Exception as exc:
            raise translate_api_error(exc, image="-", phase=phase, engine=asked) from exc


async def engine_version(
    *, url: str | None = None, engine: ContainerEngine | None = None
) -> tuple[str, str]:
    """The engine's server version and Engine API version, e.g. ("24.0.7", "1.43")."""
    info = await _query(lambda docker: docker.version(), phase="version", url=url, engine=engine)
    return str(info.get("Version", "")), str(info.get("ApiVersion", ""))


async def engine_info(
    *, url: str | None = None, engine: ContainerEngine | None = None
) -> dict[str, Any]:
    """The engine's `/info` (CDISpecDirs, Runtimes, ...), bounded like every query."""
    return dict(
        await _query(lambda docker: docker.system.info(), phase="info", url=url, engine=engine)
    )


async def version_info(
    *, url: str | None = None, engine: ContainerEngine | None = None
) -> dict[str, Any]:
    """The engine's `/version` whole: Version, ApiVersion and its Components (Podman's)."""
    return dict(
        await _query(lambda docker: docker.version(), phase="version", url=url, engine=engine)
    )


_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)")


def engine_version_of(
    info: Mapping[str, Any], component: str
) -> tuple[str, tuple[int, int] | None]:
    """From a `/version` answer: the named component's version as it says it (`5.4.2`,
    Podman's among its Components), and (major, minor) when it parses."""
    parts = info.get("Components") or []
    text = next(
        (
            str(c.get("Version"))
            for c in parts
            if component.lower() in str(c.get("Name", "")).lower()
        ),
        str(info.get("Version", "")),
    )
    match = _VERSION_RE.match(text)
    return text, (int(match.group(1)), int(match.group(2))) if match else None


async def runtimes(*, url: str | None = None, engine: ContainerEngine | None = None) -> list[str]:
    """Names of the engine's registered OCI runtimes (`nvidia` once the toolkit is set up)."""
    info = await _query(lambda docker: docker.system.info(), phase="info", url=url, engine=engine)
    return sorted(info.get("Runtimes") or {})


async def missing_images(
    images: Iterable[str], *, url: str | None = None, engine: ContainerEngine | None = None
) -> list[str]:
    """Those of `images` that are not on the engine (in the order given)."""
    asked = _engine(url, engine)
    missing = []
    async with _client(asked.url) as docker:
        for image in images:
            if await inspect_image(docker, image, engine=asked) is None:
                missing.append(image)
    return missing


def image_present(image: str, *, engine: ContainerEngine | None = None) -> bool:
    """Whether `image` is on the engine (for callers outside an event loop)."""
    return not anyio.run(functools.partial(missing_images, [image], engine=engine))


async def run_probe(
    image: str, *, url: str | None = None, engine: ContainerEngine | None = None
) -> None:
    """Run `true` in a throwaway container of `image`: create, start, wait, remove.

    The container has no network and carries llem.managed=1 with its owner's
    labels (so `reap` removes one a killed process left) and llem.probe=1.
    Raises `DockerTimeoutError` when it has not exited within PROBE_TIMEOUT_S,
    `DockerContainerError` (with its stderr tail) when it exits non-zero, and the
    translated API error when the daemon refuses a step.
    """
    exit_code, stderr, container_id = await run_once(image, ["true"], url=url, engine=engine)
    if exit_code != 0:
        raise DockerContainerError.for_engine(_engine(url, engine).name)(
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
    engine: ContainerEngine | None = None,
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
    asked = _engine(url, engine)
    async with _client(asked.url) as docker:
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
            raise DockerTimeoutError.for_engine(asked.name)(
                f"the probe container of {image} did not finish within {PROBE_TIMEOUT_S:g}s "
                f"(stuck at {phase})",
                fix_suggestion=f"Check {asked}'s `info` and its log; the engine is slow "
                "or stuck creating containers.",
            ) from exc
        except Exception as exc:
            raise translate_api_error(exc, image=image, phase=phase, engine=asked) from exc
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
    engine: ContainerEngine | None = None,
) -> None:
    """Build IMAGE from CONTEXT on `engine` (default Docker), streaming its output.

    Docker through its CLI (`docker --host URL build`, BuildKit); an engine that
    `builds_through_api` (Podman) through its own API's `POST /build`, so nothing
    of Docker's is asked. `DockerImagePullError` on failure.
    """
    engine = engine or docker_engine()
    output(f"building {image} from {context} on {engine} ...")
    if engine.builds_through_api:
        code, tail = anyio.run(
            functools.partial(_build_through_api, image, context, dockerfile, args, output, engine)
        )
    else:
        code, tail = _build_with_cli(image, context, dockerfile, args, output, engine)
    if code != 0:
        raise DockerImagePullError.for_engine(engine.name)(
            f"building {image} from {context} on {engine} failed ({code})",
            fix_suggestion="Fix the Dockerfile or its base image (set build args such as "
            f"BASE_IMAGE to an image present on {engine.name}); the build output is above.",
            stderr_snippet="\n".join(tail),
        )


def _build_with_cli(
    image: str,
    context: Path,
    dockerfile: str | None,
    args: Mapping[str, str] | None,
    output: Callable[[str], None],
    engine: ContainerEngine,
) -> tuple[int | str, list[str]]:
    cmd = ["docker", "--host", engine.url, "build", "-t", image]
    if dockerfile:
        cmd += ["-f", str(context / dockerfile)]
    for key, value in (args or {}).items():
        cmd += ["--build-arg", f"{key}={value}"]
    cmd.append(str(context))
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            output("  " + line.rstrip())
            tail = [*tail[-19:], line.rstrip()]
    return (0 if proc.returncode == 0 else f"exit {proc.returncode}"), tail


#: Bound on one build through an engine's API (a build may fetch and compile).
BUILD_TIMEOUT_S = 1800.0


async def _build_through_api(
    image: str,
    context: Path,
    dockerfile: str | None,
    args: Mapping[str, str] | None,
    output: Callable[[str], None],
    engine: ContainerEngine,
) -> tuple[int | str, list[str]]:
    """`POST /build` with the context as a tar; each streamed line shown, errors kept."""
    archive = await anyio.to_thread.run_sync(_tar_context, context, engine)
    tail: list[str] = []
    failure: int | str = 0
    async with _client(engine.url) as docker:
        try:
            with anyio.fail_after(BUILD_TIMEOUT_S):
                stream = docker.images.build(
                    fileobj=archive,
                    encoding="identity",
                    tag=image,
                    buildargs=dict(args or {}),
                    path_dockerfile=dockerfile or "Dockerfile",
                    rm=True,
                    stream=True,
                )
                async for chunk in stream:
                    line = str(chunk.get("stream") or chunk.get("error") or "").rstrip()
                    if chunk.get("error"):
                        failure = f"error: {chunk['error']}".strip()
                    if line:
                        output("  " + line)
                        tail = [*tail[-19:], line]
        except TimeoutError:
            failure = f"timed out after {BUILD_TIMEOUT_S:g}s"
        except aiodocker.exceptions.DockerStreamError as exc:
            failure = f"error: {exc.message}"
            tail = [*tail[-19:], str(exc.message)]
        except Exception as exc:
            raise translate_api_error(exc, image=image, phase="build", engine=engine) from exc
    return failure, tail


def _tar_context(context: Path, engine: ContainerEngine) -> io.BytesIO:
    """The build context as an uncompressed tar in memory (what `POST /build` takes)."""
    if not context.is_dir():
        raise DockerImagePullError.for_engine(engine.name)(
            f"the build context {context} is not a folder",
            fix_suggestion="Point `build: {context: DIR}` at the folder with the Dockerfile.",
        )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(str(context), arcname=".")
    buffer.seek(0)
    return buffer


def image_missing_error(
    image: str, detail: str | None = None, *, engine: ContainerEngine | None = None, **context: Any
) -> DockerImagePullError:
    """The error for an image that is not on the engine, with how to get it there."""
    engine = engine or docker_engine()
    detail = detail or f"No such image: {image}"
    cli = engine.name.lower()
    return DockerImagePullError.for_engine(engine.name)(
        f"image {image!r} is not present on {engine} ({detail})",
        fix_suggestion=f"Build it there (`{cli} build -t {image} .`, or give the study a "
        f"`build:` context) or pull it (`{cli} pull {image}`) on a host that can "
        "reach its registry.",
        **context,
    )


def translate_api_error(
    exc: BaseException,
    *,
    image: str,
    phase: str,
    engine: ContainerEngine | None = None,
    **context: Any,
) -> LlemError:
    """Map an aiodocker/aiohttp exception to our most specific class, naming the engine."""
    if isinstance(exc, LlemError):
        return exc
    engine = engine or docker_engine()
    if isinstance(exc, aiodocker.DockerError) and exc.status == 900:
        # aiodocker's wrapper for "could not connect"; the OS error is in the chain.
        return _connection_error(exc, phase, context, engine)
    if isinstance(exc, aiodocker.DockerError):
        status, message = exc.status, str(exc.message)
        if status == 404 and ("no such image" in message.lower() or phase in {"create", "image"}):
            return image_missing_error(image, message, engine=engine, **context)
        if "could not select device driver" in message or "nvidia-container" in message:
            return DockerGPUAccessError.for_engine(engine.name)(
                f"{engine} cannot give GPUs to containers: {message}", **context
            )
        return DockerError.for_engine(engine.name)(
            f"{engine.name} API error at {phase} (HTTP {status}, {engine.url}): {message}",
            transient=status >= 500,
            **context,
        )
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ClientOSError | OSError):
        return _connection_error(exc, phase, context, engine)
    if isinstance(exc, aiohttp.ClientError | ConnectionError):
        return DockerUnavailableError.for_engine(engine.name)(
            f"{engine} unavailable: connection lost during {phase} ({exc!r})",
            fix_suggestion=engine.start_hint,
            **context,
        )
    return DockerError.for_engine(engine.name)(
        f"unexpected error from {engine} during {phase}: {exc!r}", **context
    )


def _connection_error(
    exc: BaseException, phase: str, context: dict[str, Any], engine: ContainerEngine
) -> LlemError:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 10:
        chain.append(current)
        current = getattr(current, "os_error", None) or current.__cause__
    if (
        any(isinstance(e, PermissionError) for e in chain)
        or "permission denied" in str(exc).lower()
    ):
        return DockerPermissionError.for_engine(engine.name)(
            f"permission denied on {engine.name}'s socket {engine.url} ({exc})", **context
        )
    return DockerUnavailableError.for_engine(engine.name)(
        f"{engine} is unavailable (nothing answers there) during {phase}: {exc}",
        fix_suggestion=engine.start_hint,
        **context,
    )
