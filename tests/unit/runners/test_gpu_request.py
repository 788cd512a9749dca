"""How an engine is asked for GPUs: the decision table of `gpu_devices`, pure."""

from __future__ import annotations

import pytest

from llem_dispatch._cdi import CdiSpecs
from llem_dispatch.errors import ConfigError
from llem_dispatch.runners.gpu_request import (
    EngineGpuFacts,
    decide_mode,
    device_requests,
    visibility_env,
)

A = "GPU-5e1f0a00-0000-4000-8000-000000000000"
B = "GPU-5e1f0a01-0000-4000-8000-000000000001"
KIND = "x.test/gpu"
SPECS = CdiSpecs(devices={KIND: (A, B)})
CDI_ON = EngineGpuFacts("Docker", True, ("/etc/cdi",), SPECS)
CDI_OFF = EngineGpuFacts("Docker", False, (), SPECS)


@pytest.mark.parametrize(
    ("asked", "gpus", "facts", "mode"),
    [
        ("nvidia", [A], CDI_ON, "nvidia"),  # asked for: never second-guessed
        ("auto", [A, B], CDI_ON, "cdi"),
        ("auto", [A], CDI_OFF, "nvidia"),  # engine without CDI
        ("auto", ["0"], CDI_ON, "nvidia"),  # known only by index
        ("auto", [A, "GPU-5e1f0a09-0000-4000-8000-000000000009"], CDI_ON, "nvidia"),
        ("auto", [A], None, "nvidia"),
        ("cdi", [A, B], CDI_ON, "cdi"),
    ],
)
def test_decision(asked: str, gpus: list[str], facts: EngineGpuFacts | None, mode: str) -> None:
    assert decide_mode(asked, KIND, gpus, facts)[0] == mode  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("gpus", "facts", "says", "fix"),
    [
        ([A], CDI_OFF, "Docker has CDI off", '{"features": {"cdi": true}}'),
        (["0"], CDI_ON, "GPU 0 is not known by UUID", "nvidia-smi -L"),
        (
            [A, "GPU-5e1f0a09-0000-4000-8000-000000000009"],
            CDI_ON,
            "no CDI spec of kind x.test/gpu in /etc/cdi names GPU-5e1f0a09",
            "nvidia-ctk cdi generate",
        ),
    ],
)
def test_cdi_refusals_say_why_and_the_fix(
    gpus: list[str], facts: EngineGpuFacts, says: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        decide_mode("cdi", KIND, gpus, facts)
    assert says in caught.value.message
    assert "nothing was run" in caught.value.message
    assert fix in caught.value.fix_suggestion
    assert "gpu_devices: auto" in caught.value.fix_suggestion


def test_requests_and_env_by_mode() -> None:
    assert device_requests("cdi", [A, B], KIND) == [
        {"Driver": "cdi", "DeviceIDs": [f"{KIND}={A}", f"{KIND}={B}"]}
    ]
    assert device_requests("nvidia", [A], KIND) == [
        {"Driver": "nvidia", "DeviceIDs": [A], "Capabilities": [["gpu"]]}
    ]
    assert device_requests("env", [A], KIND) == []
    assert device_requests("cdi", [], KIND) == []
    assert visibility_env("cdi", [A, B]) == {
        "NVIDIA_VISIBLE_DEVICES": "void",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    assert visibility_env("nvidia", [A]) == {
        "NVIDIA_VISIBLE_DEVICES": A,
        "CUDA_VISIBLE_DEVICES": "0",
    }
    assert visibility_env("cdi", []) == {
        "NVIDIA_VISIBLE_DEVICES": "void",
        "CUDA_VISIBLE_DEVICES": "",
    }
