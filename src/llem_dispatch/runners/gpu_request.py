"""How a container engine is asked for an experiment's GPUs: CDI names or NVIDIA requests.

`gpu_devices:` in a study picks the mode:

- `cdi`: the engine is asked for `<cdi_kind>=<UUID>` per GPU (Container Device
  Interface): the engine gives the container exactly the devices its CDI specs
  name, by UUID. Needs the engine's CDI on and a spec naming every GPU; refused
  before anything runs otherwise.
- `nvidia`: NVIDIA device requests (`--gpus device=<id>`), as before CDI.
- `auto`: `cdi` when the engine has CDI on and a spec of `cdi_kind` names every
  GPU of the study, else `nvidia`; each record says which was taken.

Pure: the engine's facts (`EngineGpuFacts`) are gathered by the runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from llem_dispatch._cdi import CdiSpecs, is_gpu_uuid, qualified_name
from llem_dispatch.errors import ConfigError

__all__ = [
    "GPU_DEVICE_MODES",
    "EngineGpuFacts",
    "GpuDevices",
    "GpuRequestMode",
    "decide_mode",
    "device_requests",
    "visibility_env",
]

#: What a study may ask for (`gpu_devices:`).
GpuDevices = Literal["auto", "cdi", "nvidia"]
GPU_DEVICE_MODES: tuple[str, ...] = get_args(GpuDevices)
#: What a run was given its GPUs by (in its record): CDI names, NVIDIA device requests,
#: or visibility variables only (host processes, virtual GPUs, no passthrough).
GpuRequestMode = Literal["cdi", "nvidia", "env"]

_CDI_ON_DOCKER = (
    'Turn on the engine\'s CDI: add {"features": {"cdi": true}} to /etc/docker/daemon.json '
    "and restart dockerd (Docker 25 or later; on by default from 28.2)"
)
_GENERATE_SPEC = (
    "generate the spec with NVIDIA's container toolkit: "
    "`sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`"
)


@dataclass(frozen=True, slots=True)
class EngineGpuFacts:
    """What an engine says about device naming: is CDI on, and what its specs offer."""

    engine: str
    cdi_enabled: bool
    #: The engine's CDI spec dirs (Docker's /info `CDISpecDirs`; Podman's defaults).
    spec_dirs: tuple[str, ...]
    specs: CdiSpecs


def decide_mode(
    asked: GpuDevices,
    cdi_kind: str,
    gpus: Sequence[str],
    facts: EngineGpuFacts | None,
) -> tuple[GpuRequestMode, str]:
    """(the mode GPUs `gpus` are asked for by, why); `ConfigError` when `cdi` cannot be.

    `facts` None: the engine was not asked (no GPUs to hand out, say); `auto` is `nvidia`.
    """
    if asked == "nvidia":
        return "nvidia", "asked for (gpu_devices: nvidia)"
    problem = _cdi_problem(cdi_kind, gpus, facts)
    if problem is None:
        return "cdi", f"{facts.engine if facts else 'the engine'} names them by {cdi_kind}"
    if asked == "auto":
        return "nvidia", problem[0]
    why, fix = problem
    raise ConfigError(
        f"gpu_devices: cdi, but {why}; nothing was run",
        fix_suggestion=f"{fix}; or set `gpu_devices: auto` (NVIDIA device requests "
        "when CDI cannot name them).",
    )


def _cdi_problem(
    cdi_kind: str, gpus: Sequence[str], facts: EngineGpuFacts | None
) -> tuple[str, str] | None:
    """Why these GPUs cannot be asked for by CDI name (and the fix), or None when they can."""
    if facts is None:
        return "the engine was not asked whether it has CDI", "Run with a container engine"
    if not facts.cdi_enabled:
        return f"{facts.engine} has CDI off", _CDI_ON_DOCKER
    by_index = [g for g in gpus if not is_gpu_uuid(g)]
    if by_index:
        return (
            f"GPU {', '.join(by_index)} is not known by UUID (CDI names GPUs by UUID, "
            "never by a guessable index)",
            "Install nvidia-ml-py (`pip install 'llem-dispatch[nvml]'`) so indices resolve "
            "to UUIDs, or list `gpus:` by UUID (`nvidia-smi -L`)",
        )
    missing = facts.specs.missing(cdi_kind, gpus)
    if missing:
        offered = facts.specs.names(cdi_kind)
        where = ", ".join(facts.spec_dirs) or "no spec dir"
        return (
            f"no CDI spec of kind {cdi_kind} in {where} names {', '.join(missing)} "
            f"(it offers {len(offered)} device(s))",
            f"Set `cdi_kind:` to the kind of your spec, or {_GENERATE_SPEC}",
        )
    return None


def device_requests(
    mode: GpuRequestMode, gpus: Sequence[str], cdi_kind: str
) -> list[dict[str, Any]]:
    """The Engine API `HostConfig.DeviceRequests` for `gpus` by `mode` (none for `env`)."""
    if not gpus or mode == "env":
        return []
    if mode == "cdi":
        return [{"Driver": "cdi", "DeviceIDs": [qualified_name(cdi_kind, g) for g in gpus]}]
    return [{"Driver": "nvidia", "DeviceIDs": list(gpus), "Capabilities": [["gpu"]]}]


def visibility_env(mode: GpuRequestMode, gpus: Sequence[str]) -> dict[str, str]:
    """NVIDIA_VISIBLE_DEVICES / CUDA_VISIBLE_DEVICES inside the container, by `mode`.

    CUDA images default to NVIDIA_VISIBLE_DEVICES=all, so without GPUs (and with
    CDI, where the devices come from the spec, not from the NVIDIA hook) it is
    `void`: never a GPU by accident. The engine renumbers given devices from 0.
    """
    if not gpus:
        return {"NVIDIA_VISIBLE_DEVICES": "void", "CUDA_VISIBLE_DEVICES": ""}
    cuda = ",".join(str(i) for i in range(len(gpus)))
    if mode == "cdi":
        return {"NVIDIA_VISIBLE_DEVICES": "void", "CUDA_VISIBLE_DEVICES": cuda}
    return {"NVIDIA_VISIBLE_DEVICES": ",".join(gpus), "CUDA_VISIBLE_DEVICES": cuda}
