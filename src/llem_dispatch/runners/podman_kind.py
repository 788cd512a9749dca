"""The `podman` runner kind: Podman's Docker-compatible API, GPUs by CDI name only.

Podman speaks the Docker Engine API on its own socket, so the Docker kind's
runner drives it unchanged (labels and `reap`, timeouts, logs, cancellation,
prestart, the exchange dir, the container user), on another engine object: its
URL, and its quirks. Podman reads CDI specs natively, and GPUs go to its
containers by `<cdi_kind>=<UUID>` only. Before Podman 5.4 its compatible API
silently ignores device requests (a GPU container would see every GPU), so a
GPU study on an older Podman is refused before anything runs. Its images are
looked up and built through its own API, never Docker's. (`PodmanRunner`, for
library use, is in `runners.podman`.)

Where the engine is: `LLEM_ENGINE_URL` (`--engine-url`), else the rootless
socket `$XDG_RUNTIME_DIR/podman/podman.sock` when it exists, else the rootful
`/run/podman/podman.sock`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from llem_dispatch._engine import ContainerEngine
from llem_dispatch.errors import ConfigError, EngineUnavailableError, LlemError
from llem_dispatch.runners.docker_kind import DockerRunnerKind, cdi_checks, image_checks
from llem_dispatch.runners.kinds import DoctorCheck, RunnerOptions

if TYPE_CHECKING:
    from llem_dispatch.runners.docker import DockerRunner

__all__ = [
    "ENGINE_URL_ENV",
    "MIN_GPU_VERSION",
    "PodmanRunnerKind",
    "podman_engine",
    "podman_url",
    "podman_version",
    "require_podman",
]

#: The environment variable (and `--engine-url`) naming the engine's API socket.
ENGINE_URL_ENV = "LLEM_ENGINE_URL"
ROOTFUL_SOCKET = "/run/podman/podman.sock"
#: The first Podman whose Docker-compatible API honours device requests.
MIN_GPU_VERSION = (5, 4)
_START_PODMAN = (
    "Start Podman's API service: `systemctl --user start podman.socket` (rootless) or "
    "`sudo systemctl start podman.socket`, or name its socket with --engine-url / "
    f"{ENGINE_URL_ENV}=unix:///path/podman.sock."
)


def podman_url() -> str:
    """The Podman API address: LLEM_ENGINE_URL, else the rootless socket, else the rootful."""
    if explicit := os.environ.get(ENGINE_URL_ENV):
        return explicit
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and (rootless := Path(runtime_dir) / "podman" / "podman.sock").exists():
        return f"unix://{rootless}"
    return f"unix://{ROOTFUL_SOCKET}"


def podman_engine(url: str | None = None) -> ContainerEngine:
    """Podman at `url` (default `podman_url()`): CDI only, 5.4+ for GPUs, builds by its API."""
    return ContainerEngine(
        "Podman",
        url or podman_url(),
        runner_type="podman",
        cdi_native=True,
        cdi_only=True,
        min_gpu_version=MIN_GPU_VERSION,
        start_hint=_START_PODMAN,
        builds_through_api=True,
    )


async def podman_version(url: str) -> tuple[str, tuple[int, int] | None]:
    """Podman's version as it says it (`5.4.2`), and (major, minor) when it parses."""
    from llem_dispatch._docker import engine_version_of, version_info

    return engine_version_of(await version_info(engine=podman_engine(url)), "podman")


def require_podman(url: str) -> None:
    """Raise `EngineUnavailableError` (with how to start it) when nothing answers at `url`."""
    from llem_dispatch._docker import docker_available

    if not docker_available(url=url):
        raise EngineUnavailableError(
            f"Podman's API service does not answer at {url}", fix_suggestion=_START_PODMAN
        )


class PodmanRunnerKind(DockerRunnerKind):
    """The `podman` runner kind: each experiment in an ephemeral Podman container.

    Needs Podman's API service; GPUs go by CDI name (`gpu_devices: cdi` or `auto`).
    """

    engine = "Podman API service"
    summary = "Podman containers"

    def engine_url(self) -> str:
        """LLEM_ENGINE_URL, else the rootless socket when it exists, else the rootful one."""
        return podman_url()

    def container_engine(self, url: str | None = None) -> ContainerEngine:
        """Podman at `url` (default `engine_url()`), with its quirks."""
        return podman_engine(url or self.engine_url())

    async def missing_images(
        self, images: Sequence[str], *, study_dir: Path | None = None
    ) -> list[str]:
        """Those of `images` Podman does not have (asked on its socket, said how to start it)."""
        if images:
            require_podman(self.engine_url())
        return await super().missing_images(images, study_dir=study_dir)

    async def check_study(self, options: RunnerOptions, images: Sequence[str]) -> None:
        """Podman's API answers (said with how to start it), then Docker's checks."""
        require_podman(self.engine_url())
        await super().check_study(options, images)

    def build(self, options: RunnerOptions, image: str | None = None) -> DockerRunner:
        """A runner on Podman; `gpu_devices: nvidia` is refused (Podman names GPUs by CDI)."""
        if options.gpu_devices == "nvidia" and not options.virtual:
            raise ConfigError(
                "gpu_devices: nvidia, but runner podman hands GPUs over by CDI name only",
                fix_suggestion="Set `gpu_devices: cdi` (or `auto`), with a CDI spec naming the "
                "GPUs (`sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`).",
            )
        return super().build(options, image)

    async def doctor_checks(
        self, images: Sequence[str] = (), *, required: bool = True, buildable: bool = False
    ) -> list[DoctorCheck]:
        """Podman's API service, its version (5.4+ for GPUs), CDI; then each image."""
        url = self.engine_url()
        if not self.available():
            return [
                DoctorCheck(
                    "Podman API", False, f"nothing answers at {url}", _START_PODMAN, not required
                )
            ]
        try:
            text, version = await podman_version(url)
        except LlemError as exc:
            return [DoctorCheck("Podman API", False, exc.message, exc.fix_suggestion)]
        gpus_ok = version is not None and version >= MIN_GPU_VERSION
        checks = [
            DoctorCheck("Podman API", True, f"Podman {text} at {url}"),
            DoctorCheck(
                "Podman GPU requests",
                gpus_ok,
                "device requests honoured (5.4+)"
                if gpus_ok
                else f"{text} ignores device requests: GPU studies are refused",
                "" if gpus_ok else "Upgrade Podman to 5.4 or later for GPU studies.",
                optional=True,
            ),
        ]
        engine = self.container_engine(url)
        checks += await cdi_checks(engine, cdi_native=True)
        for image in images:
            checks += await image_checks(image, buildable, engine=engine)
        return checks
