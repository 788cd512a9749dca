"""The dry run says how GPUs are handed on: cooldown, thermal gate, residual memory."""

from __future__ import annotations

from llem_dispatch.cli.run import _gpu_policy
from llem_dispatch.study import Study


def test_real_gpus_show_the_memory_hold_back_and_the_gate() -> None:
    study = Study.model_validate(
        {"grid": {"x": [1]}, "experiment_gap_s": 2, "settle": {"temperature_c": 2, "max_s": 90}}
    )
    line = _gpu_policy(study, virtual=False)
    assert "cooldown 2s" in line
    assert "thermal gate (within 2 C / 10 W of idle for 3s, 5-90s)" in line
    assert "held back while over 512 MiB" in line


def test_virtual_gpus_say_neither_applies() -> None:
    study = Study.model_validate({"grid": {"x": [1]}, "residual_memory_mb": None})
    assert _gpu_policy(study, virtual=True) == "GPUs: virtual ids, cooldown 0s"
    assert "no residual-memory check" in _gpu_policy(study, virtual=False)
