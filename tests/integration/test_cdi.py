"""GPUs by UUID through CDI, on the real Docker Engine with its `cdi` feature on.

This machine has no GPU: .ci/setup-docker.sh writes a made-up CDI spec of four
"GPUs" (kind llem.test/gpu) named by fake UUIDs, each adding one environment
variable with its own UUID. What a container finds in its environment is what
the engine really gave it.
"""

from __future__ import annotations

import json
from datetime import datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BUSYBOX_IMAGE, CDI_TEST_KIND, cdi_test_uuids, labelled_containers
from tests.integration.test_cli import cli

pytestmark = [pytest.mark.docker, pytest.mark.cdi, pytest.mark.usefixtures("no_leaked_containers")]

#: Writes what the engine gave the container: the CDI devices' variables, and ours.
SEEN_SCRIPT = (
    "seen=$(env | grep '^LLEM_CDI_GPU_' | sed 's/^[^=]*=//' | sort | tr '\\n' ' '); "
    "sleep 1; "
    'printf \'{"seen": "%s", "ids": "%s", "nvidia": "%s", "cuda": "%s"}\' '
    '"$seen" "$LLEM_GPU_IDS" "$NVIDIA_VISIBLE_DEVICES" "$CUDA_VISIBLE_DEVICES" '
    "> $LLEM_RESULT_PATH"
)


def cdi_study(
    tmp_path: Path,
    labels: dict[str, str],
    *,
    gpus: list[str],
    mode: str = "cdi",
    kind: str = CDI_TEST_KIND,
    n: int = 8,
) -> Path:
    label_lines = "\n".join(f"  {k}: {json.dumps(v)}" for k, v in labels.items())
    path = tmp_path / "study.yaml"
    path.write_text(f"""name: cditest
image: {BUSYBOX_IMAGE}
command: ["sh", "-c", {json.dumps(SEEN_SCRIPT)}]
gpus: {json.dumps(gpus)}
gpu_devices: {mode}
cdi_kind: {kind}
gpus_field: g
network: none
shm_size: 16m
timeout_s: 60
labels:
{label_lines}
grid:
  i: {list(range(n // 2))}
  g: [1, 2]
""")
    return path


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_each_container_gets_exactly_its_gpus_by_uuid(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    """Mixed 1- and 2-GPU experiments on 4 CDI GPUs listed by UUID."""
    uuids = cdi_test_uuids()
    out = tmp_path / "out"
    proc = cli("run", str(cdi_study(tmp_path, test_labels, gpus=uuids)), "--results", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = records(out)
    assert len(done) == 8
    for record in done:
        result = record["result"]["data"]
        seen = result["seen"].split()
        assert record["status"] == "succeeded"
        assert record["gpu_request"] == "cdi"
        assert len(seen) == record["config"]["g"]
        # Exactly its GPUs: the devices the engine injected are the ones recorded.
        assert sorted(seen) == sorted(record["gpu_ids"]) == sorted(record["gpu_uuids"])
        assert set(seen) <= set(uuids)
        assert result["ids"].split(",") == record["gpu_ids"]
        assert result["nvidia"] == "void"  # no NVIDIA hook may add a GPU on top
        assert result["cuda"] == ",".join(str(i) for i in range(len(seen)))
    # No UUID in two containers at once.
    spans = [
        (set(r["gpu_ids"]), _when(r["started_at"]), _when(r["exited_at"]), r["config_hash"])
        for r in done
    ]
    for (ids_a, start_a, end_a, a), (ids_b, start_b, end_b, b) in combinations(spans, 2):
        if ids_a & ids_b:
            assert end_a <= start_b or end_b <= start_a, f"{a} and {b} shared {ids_a & ids_b}"
    # And the GPUs were shared out in parallel, not one experiment at a time.
    overlapping = sum(
        1 for (_, s1, e1, _), (_, s2, e2, _) in combinations(spans, 2) if s1 < e2 and s2 < e1
    )
    assert overlapping >= 2


def test_auto_takes_cdi_when_a_spec_names_every_gpu(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    out = tmp_path / "out"
    study = cdi_study(tmp_path, test_labels, gpus=cdi_test_uuids()[:2], mode="auto", n=2)
    proc = cli("run", str(study), "--results", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = records(out)
    assert [r["gpu_request"] for r in done] == ["cdi", "cdi"]
    assert all(sorted(r["result"]["data"]["seen"].split()) == sorted(r["gpu_ids"]) for r in done)


def test_cdi_refuses_a_gpu_no_spec_names_before_anything_runs(
    tmp_path: Path, test_labels: dict[str, str]
) -> None:
    stranger = "GPU-0badc0de-0000-4000-8000-000000000009"
    out = tmp_path / "out"
    study = cdi_study(tmp_path, test_labels, gpus=[*cdi_test_uuids()[:1], stranger])
    proc = cli("run", str(study), "--results", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert stranger in text
    assert f"no CDI spec of kind {CDI_TEST_KIND}" in text
    assert "nvidia-ctk cdi generate" in text  # the fix
    assert "Traceback" not in text
    assert not list((out / "records").glob("*.json"))
    assert not labelled_containers(f"llem.test.node={test_labels['llem.test.node']}")


def test_cdi_refuses_gpus_known_only_by_index(tmp_path: Path, test_labels: dict[str, str]) -> None:
    """No NVML here: index 0 cannot be resolved to a UUID, so CDI cannot name it."""
    out = tmp_path / "out"
    proc = cli("run", str(cdi_study(tmp_path, test_labels, gpus=["0", "1"])), "--results", str(out))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "is not known by UUID" in text
    assert "nvidia-smi -L" in text
    assert not list((out / "records").glob("*.json"))


def test_dry_run_shows_the_cdi_request(tmp_path: Path, test_labels: dict[str, str]) -> None:
    study = cdi_study(tmp_path, test_labels, gpus=cdi_test_uuids())
    proc = cli("run", str(study), "--dry-run", "--results", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '"Driver": "cdi"' in proc.stdout
    assert f"{CDI_TEST_KIND}=" in proc.stdout


def test_doctor_says_cdi_is_on_and_what_the_specs_offer() -> None:
    proc = cli("doctor")
    text = proc.stdout
    assert "PASS CDI: on, spec dirs /etc/cdi" in text, text
    assert f"{CDI_TEST_KIND}: 4 device(s)" in " ".join(text.split())
    assert cdi_test_uuids()[0] in text.replace("\n", "")
