"""Study files built to hurt: alias bombs, huge grids, duplicate keys; all refused, quickly."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llem_dispatch import ConfigError, load_study


def _bomb(levels: int) -> str:
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]']
    for n in range(1, levels):
        lines.append(f"l{n}: &l{n} [" + ",".join([f"*l{n - 1}"] * 10) + "]")
    return "\n".join(lines) + f"\nbase: {{x: *l{levels - 1}}}\n"


def test_yaml_alias_bomb_is_refused_without_expanding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(10))  # 10^10 values once expanded
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"expands to .* values through its aliases"):
        load_study(path)
    assert time.perf_counter() - started < 10  # bounded, not 4 GB and counting


def test_small_aliases_still_load(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("base: &b {model: m, dtype: bf16}\nconfigs: [*b, {<<: *b, dtype: fp16}]\n")
    study = load_study(path)
    assert [c["dtype"] for c in study.configs] == ["bf16", "fp16"]


def test_grid_over_the_limit_is_refused_before_expansion(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    keys = ", ".join(f"k{i}: [0,1,2,3,4,5,6,7,8,9]" for i in range(12))
    path.write_text(f"grid: {{{keys}}}\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"1,000,000,000,000 experiments .* max_experiments"):
        load_study(path)
    assert time.perf_counter() - started < 10


def test_grid_limit_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text("grid: {a: [1, 2, 3], b: [1, 2]}\nn_cycles: 2\nmax_experiments: 10\n")
    with pytest.raises(ConfigError, match="12 experiments"):
        load_study(path)
    path.write_text("grid: {a: [1, 2, 3], b: [1, 2]}\nn_cycles: 2\nmax_experiments: 12\n")
    assert load_study(path).planned_experiments() == 12


def test_duplicate_keys_are_an_error_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("grid: {x: [1]}\nn_cycles: 2\ntimeout_s: 5\nn_cycles: 3\n")
    with pytest.raises(ConfigError, match="n_cycles is given twice, at lines 2 and 4"):
        load_study(path)


def test_nested_duplicate_keys_too(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("base:\n  model: a\n  model: b\n")
    with pytest.raises(ConfigError, match=r"base\.model is given twice, at lines 2 and 3"):
        load_study(path)


def test_unknown_field_suggests_the_nearest(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("grid: {x: [1]}\ngpu_per_experiment: 1\n")
    with pytest.raises(ConfigError, match=r":2: gpu_per_experiment: .*'gpus_per_experiment'"):
        load_study(path)
