"""CDI spec files and device names (the `_cdi` edge): pure, on files in a temp dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llem_dispatch._cdi import check_kind, is_gpu_uuid, qualified_name, read_specs

UUID_A = "GPU-5e1f0a00-0000-4000-8000-000000000000"
UUID_B = "GPU-5e1f0a01-0000-4000-8000-000000000001"


@pytest.mark.parametrize(
    ("device", "uuid"),
    [
        (UUID_A, True),
        ("MIG-5e1f0a00-0000-4000-8000-000000000000", True),
        ("0", False),
        ("GPU-5e1f", False),  # a prefix, which CUDA accepts but CDI cannot name
        ("gpu-5e1f0a00-0000-4000-8000-000000000000", False),
    ],
)
def test_uuid_or_index(device: str, uuid: bool) -> None:
    assert is_gpu_uuid(device) is uuid


@pytest.mark.parametrize("kind", ["nvidia.com/gpu", "llem.test/gpu", "amd.com/gpu"])
def test_valid_kinds(kind: str) -> None:
    assert check_kind(kind) == kind
    assert qualified_name(kind, UUID_A) == f"{kind}={UUID_A}"


@pytest.mark.parametrize("kind", ["nvidia.com", "gpu", "/gpu", "nvidia.com/", "a b/gpu", ""])
def test_invalid_kinds_say_the_form(kind: str) -> None:
    with pytest.raises(ValueError, match="vendor/class"):
        check_kind(kind)


def test_reads_yaml_and_json_specs_and_reports_broken_ones(tmp_path: Path) -> None:
    etc, run = tmp_path / "etc", tmp_path / "run"
    etc.mkdir()
    run.mkdir()
    (etc / "a.yaml").write_text(
        f"cdiVersion: '0.6.0'\nkind: x.test/gpu\ndevices:\n  - name: {UUID_A}\n"
        "    containerEdits: {env: [A=1]}\n"
    )
    (run / "b.json").write_text(
        json.dumps({"cdiVersion": "0.6.0", "kind": "x.test/gpu", "devices": [{"name": UUID_B}]})
    )
    (etc / "other.yml").write_text("kind: vendor.io/fpga\ndevices: [{name: f0}]\n")
    (etc / "broken.yaml").write_text("kind: [not, a, kind]\n")
    (etc / "notes.txt").write_text("not a spec, not read")
    specs = read_specs([etc, run, tmp_path / "missing"])
    assert specs.names("x.test/gpu") == (UUID_A, UUID_B)
    assert specs.names("vendor.io/fpga") == ("f0",)
    assert specs.names("nvidia.com/gpu") == ()
    assert specs.missing("x.test/gpu", [UUID_B, "GPU-other"]) == ["GPU-other"]
    assert len(specs.problems) == 1
    assert "broken.yaml" in specs.problems[0]
