"""Reading what an experiment left: other images' result names, hostile JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llem_dispatch._exchange import ExchangeDir
from llem_dispatch.errors import ResultError


def exchange(tmp_path: Path) -> ExchangeDir:
    return ExchangeDir.create("0123456789abcdef", base_dir=tmp_path)


def test_own_result_name_wins(tmp_path: Path) -> None:
    ex = exchange(tmp_path)
    (ex.path / ex.result_name).write_text('{"a": 1}')
    (ex.path / "ffffffffffffffff_result.json").write_text('{"a": 2}')
    read = ex.read_outcome()
    assert (read.result, read.result_file) == ({"a": 1}, ex.result_name)


def test_the_one_result_under_another_hash_is_read_and_named(tmp_path: Path) -> None:
    # llenergymeasure's entrypoint names the result by its own hash of the config.
    ex = exchange(tmp_path)
    (ex.path / "9e3a1c0b77d2f4aa_result.json").write_text('{"tokens_per_s": 10.5}')
    read = ex.read_outcome()
    assert read.result == {"tokens_per_s": 10.5}
    assert read.result_file == "9e3a1c0b77d2f4aa_result.json"


def test_two_foreign_results_are_refused_by_name(tmp_path: Path) -> None:
    ex = exchange(tmp_path)
    for name in ("aaaa_result.json", "bbbb_result.json"):
        (ex.path / name).write_text("{}")
    with pytest.raises(ResultError, match=r"aaaa_result\.json, bbbb_result\.json"):
        ex.read_outcome()


def test_a_foreign_result_that_is_a_link_is_never_followed(tmp_path: Path) -> None:
    ex = exchange(tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text('{"stolen": true}')
    (ex.path / "aaaa_result.json").symlink_to(secret)
    with pytest.raises(ResultError, match="symbolic link"):
        ex.read_outcome()


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused_not_stored_as_null(tmp_path: Path, constant: str) -> None:
    ex = exchange(tmp_path)
    (ex.path / ex.result_name).write_text(f'{{"energy_j": {constant}}}')
    with pytest.raises(ResultError, match=f"holds {constant}"):
        ex.read_outcome()


def test_a_100000_deep_result_is_a_result_error(tmp_path: Path) -> None:
    ex = exchange(tmp_path)
    depth = 100_000
    (ex.path / ex.result_name).write_text("[" * depth + "]" * depth)
    with pytest.raises(ResultError, match="nested too deeply"):
        ex.read_outcome()


def test_an_ordinary_result_still_reads(tmp_path: Path) -> None:
    ex = exchange(tmp_path)
    (ex.path / ex.result_name).write_text(json.dumps({"x": [1.5, None, "NaN"]}))
    assert ex.read_outcome().result == {"x": [1.5, None, "NaN"]}
