"""examples/llm_energy on a CPU: the experiment with a tiny Llama, the study files, the checks.

The experiment needs torch and transformers: without them these tests skip with the
reason, except under LLEM_REQUIRE_TORCH=1 (CI), where they fail instead, so the
example cannot rot unnoticed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from llem_dispatch.study import expand_study, load_study

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llm_energy"
TINY = {
    "model": "tiny",
    "batch_size": 2,
    "prompt_tokens": 8,
    "max_new_tokens": 4,
    "repeats": 2,
    "gpus": 1,
}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"llm_energy_{name}", EXAMPLE / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def experiment() -> ModuleType:
    """The example's experiment module, once torch and transformers import."""
    for name in ("torch", "transformers"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            reason = f"{name} is not installed ({exc}): pip install torch transformers"
            if os.environ.get("LLEM_REQUIRE_TORCH") == "1":
                pytest.fail(f"LLEM_REQUIRE_TORCH=1 but {reason}")
            pytest.skip(reason + " (LLEM_REQUIRE_TORCH=1 makes this a failure)")
    return _load("experiment")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_experiment_generates_and_reports_on_cpu(
    experiment: ModuleType, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("LLEM_GPU_IDS", raising=False)
    result = experiment.run({**TINY, "dtype": dtype})
    json.dumps(result, allow_nan=False)  # what the container helper will write
    assert result["model"] == "tiny"
    assert result["dtype"] == dtype
    assert result["output_tokens"] == 2 * 4
    assert result["prefill_s"] > 0
    assert result["total_s"] > 0
    # Medians of separate windows: on a tiny CPU model the one extra token costs less
    # than the timing noise, so the full window can come out shorter than prefill
    # (seen in CI: 8.9 ms against 9.7 ms). Decode is then 0, never negative.
    assert result["decode_s"] == pytest.approx(max(result["total_s"] - result["prefill_s"], 0))
    assert result["tokens_per_s"] == pytest.approx(8 / result["total_s"])
    assert len(result["windows"]["full"]["times_s"]) == 2
    assert 0 < result["params_b"] < 0.001
    # No GPU: nothing to read energy or GPU memory from, and it says so.
    assert result["gpu_name"] == "cpu"
    assert result["gpu_uuids"] == ""
    assert result["energy_j"] is None
    assert result["j_per_token"] is None
    assert result["peak_memory_gib"] is None


def test_weights_on_disk_with_and_without_a_prepare_phase(
    experiment: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("LLEM_GPU_IDS", raising=False)
    marks = tmp_path / "marks.jsonl"
    monkeypatch.setenv("LLEM_MARKS_PATH", str(marks))
    path = experiment.write_weights("tiny", str(tmp_path / "w"))
    assert (Path(path) / "model.safetensors").exists()
    config = {**TINY, "weights_dir": str(tmp_path / "w")}
    plain = experiment.run(config)
    assert plain["phases_s"]["load_s"] > 0
    assert [json.loads(line)["mark"] for line in marks.read_text().splitlines()] == ["work"]
    # The prepare phase: a generator that yields when prepared, then when measuring.
    steps = experiment.prepared(config)
    next(steps)  # prepared: the weights are in host memory, nothing on a GPU
    next(steps)  # measuring starts
    with pytest.raises(StopIteration) as done:
        next(steps)
    result = done.value.value
    json.dumps(result, allow_nan=False)
    assert result["phases_s"]["host_read_s"] > 0
    assert result["output_tokens"] == plain["output_tokens"] == 2 * 4
    assert result["params_b"] == pytest.approx(plain["params_b"])


@pytest.mark.parametrize("name", ["study-disk", "study-disk-prepare"])
def test_disk_studies_differ_only_in_their_function(name: str) -> None:
    study = load_study(EXAMPLE / f"{name}.yaml")
    assert study.function == ("disk:prepared" if name.endswith("prepare") else "disk:run")
    assert study.prestart
    assert study.experiment_gap_s == 2
    assert len(expand_study(study)) == 8


def test_device_map_covers_every_weight_in_contiguous_blocks(experiment: ModuleType) -> None:
    model = experiment.build_model({**TINY, "arch": {"num_hidden_layers": 5}}, ["cpu"])
    device_map = experiment.split_device_map(5, [0, 1])
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    uncovered = [n for n in names if not any(n.startswith(k + ".") for k in device_map)]
    assert not uncovered
    layers = [device_map[f"model.layers.{i}"] for i in range(5)]
    assert layers == [0, 0, 0, 1, 1]
    assert device_map["model.embed_tokens"] == 0
    assert device_map["lm_head"] == 1
    tied = experiment.split_device_map(4, [0, 1], tied_embeddings=True)
    assert tied["lm_head"] == tied["model.embed_tokens"] == 0


@pytest.mark.parametrize(("name", "count", "two_gpu"), [("study", 18, 6), ("study-1gpu", 12, 0)])
def test_study_files_expand_with_their_gpu_counts(name: str, count: int, two_gpu: int) -> None:
    experiments = expand_study(load_study(EXAMPLE / f"{name}.yaml"))
    assert len(experiments) == count
    assert sum(e.gpu_count == 2 for e in experiments) == two_gpu
    assert all(e.gpu_count == 2 for e in experiments if e.config["model"] == "llama-8b")
    assert {e.config["batch_size"] for e in experiments} == {1, 8, 32}
    assert {e.config["dtype"] for e in experiments} == {"bf16", "fp16"}


def _record(key: str, gpus: list[str], start: str, end: str, uuids: list[str]) -> dict[str, Any]:
    energy = dict.fromkeys(uuids, 10.0)
    return {
        "config_hash": key,
        "status": "succeeded",
        "gpu_ids": gpus,
        "started_at": f"2026-01-01T00:00:{start}+00:00",
        "exited_at": f"2026-01-01T00:00:{end}+00:00",
        "config": {"model": "tiny"},
        "result": {
            "data": {
                "gpu_name": "NVIDIA H200",
                "gpu_uuids": ",".join(uuids),
                "assigned_uuids": uuids,
                "energy_j_per_gpu": energy,
            }
        },
    }


def test_report_checks_catch_sharing_short_cooldowns_and_foreign_energy() -> None:
    report = _load("report")
    good = [
        _record("a", ["0"], "00", "10", ["GPU-a"]),
        _record("b", ["1"], "01", "09", ["GPU-b"]),
        _record("c", ["0", "1"], "15", "20", ["GPU-a", "GPU-b"]),
    ]
    assert report.check_gpus(good) == []
    assert report.check_intervals(good, gap_s=5) == []
    assert report.check_intervals(good, gap_s=5.5) == ["GPU 0: 5.00s between a and c"]
    shared = [*good, _record("d", ["0"], "05", "12", ["GPU-a"])]
    assert any("overlap" in p for p in report.check_intervals(shared, gap_s=0))
    serial = [good[0], _record("b", ["1"], "11", "12", ["GPU-b"])]
    assert report.check_intervals(serial, gap_s=0) == [
        "no two 1-GPU experiments ran at the same time on different GPUs"
    ]
    foreign = _record("e", ["1"], "30", "40", ["GPU-b"])
    foreign["result"]["data"]["energy_j_per_gpu"] = {"GPU-a": 1.0, "GPU-b": 1.0}
    assert report.check_gpus([foreign]) == [
        "e: energy_j_per_gpu read on ['GPU-a', 'GPU-b'], its GPUs are ['GPU-b']"
    ]
    wrong = _record("f", ["0"], "30", "40", ["GPU-b"])
    wrong["result"]["data"]["assigned_uuids"] = ["GPU-a"]
    assert any("CUDA saw" in p for p in report.check_gpus([wrong]))
