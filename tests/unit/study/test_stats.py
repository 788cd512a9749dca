"""Statistics across cycles: the t quantile against closed forms and published values,
mean/std/CI against numpy, and `results --stats` / `load_stats` on a written results dir."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from llem_dispatch.cli import app
from llem_dispatch.models import compute_config_hash
from llem_dispatch.report import stats_rows
from llem_dispatch.study.stats import describe, t_cdf, t_quantile


def _closed_form(p: float, df: int) -> float:
    """Student-t quantiles with a closed form (df 1, 2, 4)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    alpha = 4 * p * (1 - p)
    q = math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha)
    return math.copysign(2 * math.sqrt(q - 1), p - 0.5)


@pytest.mark.parametrize("df", [1, 2, 4])
@pytest.mark.parametrize("p", [0.5001, 0.6, 0.9, 0.975, 0.995, 0.9999, 0.025, 0.1])
def test_t_quantile_matches_closed_forms(p: float, df: int) -> None:
    assert t_quantile(p, df) == pytest.approx(_closed_form(p, df), rel=1e-10)


#: scipy.stats.t.ppf(0.975, df), as published (and computed by scipy 1.11).
KNOWN_975 = {
    3: 3.182446305284263,
    5: 2.570581835636314,
    7: 2.364624251592785,
    9: 2.262157162740992,
    11: 2.200985160082949,
    20: 2.085963447265837,
    30: 2.042272456301238,
    60: 2.000297822014004,
    120: 1.979930405082603,
}


@pytest.mark.parametrize(("df", "expected"), sorted(KNOWN_975.items()))
def test_t_quantile_matches_known_values(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, rel=1e-9)


def test_t_quantile_tends_to_the_normal_and_inverts_the_cdf() -> None:
    normal = statistics.NormalDist().inv_cdf(0.975)
    assert t_quantile(0.975, 1e7) == pytest.approx(normal, rel=1e-6)
    assert t_quantile(0.975, 1000) > t_quantile(0.975, 10_000) > normal
    for p in (0.01, 0.3, 0.77, 0.999):
        for df in (1.5, 3, 17, 250):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.9, 0)


def test_describe_matches_numpy() -> None:
    numpy = pytest.importorskip("numpy")
    rng = random.Random(7)
    for n in (2, 3, 5, 12, 40):
        values = [rng.gauss(100.0, 3.0) for _ in range(n)]
        got = describe(values)
        array = numpy.asarray(values)
        std = float(array.std(ddof=1))
        assert got.n == n
        assert got.mean == pytest.approx(float(array.mean()), rel=1e-12)
        assert got.std == pytest.approx(std, rel=1e-12)
        assert got.ci95 == pytest.approx(t_quantile(0.975, n - 1) * std / math.sqrt(n), rel=1e-12)


def test_describe_of_too_few_values_has_no_spread() -> None:
    assert describe([]).mean is None
    one = describe([4.0, math.nan])
    assert (one.n, one.mean, one.std, one.ci95) == (1, 4.0, None, None)
    assert not one.within(0.5), "one value says nothing about its spread"
    same = describe([3.0, 3.0, 3.0])
    assert same.ci95 == 0.0
    assert same.within(0.0)
    assert describe([0.0, 0.0]).rel_ci95 == 0.0
    assert describe([-1.0, 1.0]).rel_ci95 == math.inf


# -- results --stats and load_stats -----------------------------------------------------

ENERGY = {"a": [10.0, 11.0, 12.5], "b": [20.0, 20.0, 20.0]}


def _record(
    config: dict[str, Any], cycle: int, status: str, data: dict[str, Any]
) -> dict[str, Any]:
    digest = compute_config_hash(config)
    return {
        "key": f"{digest}_c{cycle}",
        "config_hash": digest,
        "cycle": cycle,
        "status": status,
        "config": config,
        "started_at": f"2026-01-01T00:00:0{cycle}+00:00",
        "ended_at": f"2026-01-01T00:00:0{cycle}.5+00:00",
        "gpu_ids": ["0"],
        "result": {"data": data} if status == "succeeded" else None,
    }


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    path = tmp_path / "res"
    (path / "records").mkdir(parents=True)
    records = []
    for name, energies in ENERGY.items():
        for cycle, energy in enumerate(energies, 1):
            data = {"energy_j": energy, "tokens": 100, "note": "text", "ok": True}
            records.append(_record({"model": name}, cycle, "succeeded", data))
    records.append(_record({"model": "a"}, 4, "failed", {}))
    for record in records:
        (path / "records" / f"{record['key']}.json").write_text(json.dumps(record))
    study = {"study": {"name": "s", "grid": {"model": ["a", "b"]}}}
    (path / "study.json").write_text(json.dumps(study))
    return path


def test_stats_rows_per_config(results_dir: Path) -> None:
    records = [json.loads(p.read_text()) for p in (results_dir / "records").glob("*.json")]
    rows = {r["param.model"]: r for r in stats_rows(records, ["model"])}
    a = rows["a"]
    assert (a["n"], a["runs"]) == (3, 4), "the failed cycle is a run, not a value"
    expected = describe(ENERGY["a"])
    assert a["result.energy_j_mean"] == pytest.approx(11.1666666666, rel=1e-9)
    assert a["result.energy_j_std"] == expected.std
    assert a["result.energy_j_ci95"] == pytest.approx(4.303 * expected.std / math.sqrt(3), rel=1e-3)
    assert rows["b"]["result.energy_j_ci95"] == 0.0
    assert a["duration_s_mean"] == pytest.approx(0.5)
    assert "result.note_mean" not in a, "only numbers"
    assert "result.ok_mean" not in a, "a bool is not a measurement"
    assert a["result.tokens_std"] == 0.0


def test_results_stats_csv_and_table(results_dir: Path) -> None:
    out = CliRunner().invoke(app, ["results", str(results_dir), "--stats", "--format", "jsonl"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert [r["param.model"] for r in rows] == ["a", "b"]
    assert {"n", "result.energy_j_mean", "result.energy_j_std", "result.energy_j_ci95"} <= set(
        rows[0]
    )
    csv_out = CliRunner().invoke(app, ["results", str(results_dir), "--stats", "--format", "csv"])
    assert csv_out.exit_code == 0
    assert csv_out.output.splitlines()[0].startswith("config_hash,param.model,n,runs,")
    table = CliRunner().invoke(
        app, ["results", str(results_dir), "--stats"], env={"COLUMNS": "120"}
    )
    assert table.exit_code == 0, table.output
    assert "11.17 ± " in table.output
    assert "20.00 ± 0" in table.output


def test_load_stats_and_parquet(results_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    from llem_dispatch import load_results, load_stats

    frame = load_results(results_dir, stats=True)
    assert list(frame["n"]) == [3, 3]
    same = load_stats(results_dir)
    assert frame.equals(same)
    numpy = pytest.importorskip("numpy")
    assert frame.loc[0, "result.energy_j_std"] == pytest.approx(
        float(numpy.std(ENERGY["a"], ddof=1))
    )
    pytest.importorskip("pyarrow")
    target = tmp_path / "stats.parquet"
    out = CliRunner().invoke(
        app, ["results", str(results_dir), "--stats", "--format", "parquet", "-o", str(target)]
    )
    assert out.exit_code == 0, out.output
    import pandas

    assert list(pandas.read_parquet(target)["n"]) == [3, 3]
