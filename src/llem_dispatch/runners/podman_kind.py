"""The `podman` runner kind: Podman's Docker-compatible API, GPUs by CDI name only.

Podman speaks the Docker Engine API on its own socket, so the Docker runner
drives it unchanged (labels and `reap`, timeouts, logs, cancellation, prestart,
the exchange dir, the container user); only where the engine is and how GPUs
are asked for differ. Podman reads CDI specs natively, and GPUs go to its
containers by `<cdi_kind>=<UUID>` only. Before Podman 5.4 its compatible API
silently ignores device requests (a GPU container would see every GPU), so a
GPU study on an older Podman is refused before anything runs.

Where the engine is: `LLEM_ENGINE_URL` (`--engine-url`), else the rootless
socket `$XDG_RUNTIME_DIR/podman/podman.sock` when it exists, else the rootful
`/run/podman/podman.sock`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llem_dispatch._cdi import DEFAULT_SPEC_DIRS, read_specs
from llem_dispatch._docker import docker_available, version_info
from llem_dispatch.errors import ConfigError, EngineUnavailableError, LlemError
from llem_dispatch.runners.docker import DockerRunner
from llem_dispatch.runners.docker_kind import DockerRunnerKind, cdi_checks, image_checks
from llem_dispatch.runners.gpu_request import EngineGpuFacts
from llem_dispatch.runners.kinds import DoctorCheck, RunnerOptions

__all__ = [
    "ENGINE_URL_ENV",
    "MIN_GPU_VERSION",
    "PodmanRunner",
    "PodmanRunnerKind",
    "podman_url",
    "podman_version",
    "require_podman",
]

#: The environment variable (and `--engine-url`) naming the engine's API socket.
ENGINE_URL_ENV = "LLEM_ENGINE_URL"
ROOTFUL_SOCKET = "/run/podman/podman.sock"
#: The first Podman whose Docker-compatible API honours device requests.
MIN_GPU_VERSION = (5, 4)
_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)")
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


async def podman_version(url: str) -> tuple[str, tuple[int, int] | None]:
    """Podman's version as it says it (`5.4.2`), and (major, minor) when it parses."""
    info = await version_info(url=url)
    components = info.get("Components") or []
    text = next(
        (str(c.get("Version")) for c in components if "podman" in str(c.get("Name", "")).lower()),
        str(info.get("Version", "")),
    )
    match = _VERSION_RE.match(text)
    return text, (int(match.group(1)), int(match.group(2))) if match else None


def require_podman(url: str) -> None:
    """Raise `EngineUnavailableError` (with how to start it) when nothing answers at `url`."""
    if not docker_available(url=url):
        raise EngineUnavailableError(
            f"Podman's API service does not answer at {url}", fix_suggestion=_START_PODMAN
        )


class PodmanRunner(DockerRunner):
    """A DockerRunner on Podman's Docker-compatible API; GPUs by CDI name only."""

    runner_type = "podman"
    engine_name = "Podman"

    def __init__(self, image: str, **kwargs: Any) -> None:
        if kwargs.get("gpu_devices") == "nvidia" and kwargs.get("gpu_passthrough", True):
            raise ValueError("PodmanRunner asks for GPUs by CDI name only: gpu_devices='cdi'")
        super().__init__(image, **{**kwargs, "gpu_devices": "cdi"})
        if self._docker_host is None:
            self._docker_host = podman_url()

    async def gpu_facts(self) -> EngineGpuFacts:
        """Podman always has CDI: what the specs in its default dirs offer."""
        if self._gpu_facts is None:
            specs = read_specs(DEFAULT_SPEC_DIRS)
            self._gpu_facts = EngineGpuFacts("Podman", True, DEFAULT_SPEC_DIRS, specs)
        return self._gpu_facts

    async def check_gpus(self, gpus: Sequence[str]) -> None:
        """Refuse a GPU study on a Podman that would ignore the device requests, then decide."""
        require_podman(self._engine_url())
        if gpus and self.gpu_passthrough:
            text, version = await podman_version(self._engine_url())
            if version is None or version < MIN_GPU_VERSION:
                raise ConfigError(
                    f"Podman {text or '(version unknown)'} at {self._engine_url()}: its "
                    "Docker-compatible API ignores device requests before 5.4, so every "
                    "container would see every GPU; nothing was run",
                    fix_suggestion="Upgrade Podman to 5.4 or later, or run this study with "
                    "`runner: docker`; for a CPU-only study, set `virtual_gpus: N`.",
                )
        await super().check_gpus(gpus)


class PodmanRunnerKind(DockerRunnerKind):
    """The `podman` runner kind: each experiment in an ephemeral Podman container.

    Needs Podman's API service; GPUs go by CDI name (`gpu_devices: cdi` or `auto`).
    """

    engine = "Podman API service"
    summary = "Podman containers"
    runner_class = PodmanRunner

    def engine_url(self) -> str:
        """LLEM_ENGINE_URL, else the rootless socket when it exists, else the rootful one."""
        return podman_url()

    async def check_study(self, options: RunnerOptions, images: Sequence[str]) -> None:
        """Podman's API answers (said with how to start it), then Docker's checks."""
        require_podman(self.engine_url())
        await super().check_study(options, images)

    def build(self, options: RunnerOptions, image: str | None = None) -> DockerRunner:
        """A PodmanRunner; `gpu_devices: nvidia` is refused (Podman names GPUs by CDI)."""
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
        checks += await cdi_checks(url, cdi_native=True, engine="Podman")
        for image in images:
            checks += await image_checks(image, buildable, url=url)
        return checks
