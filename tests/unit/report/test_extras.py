"""The report's extra is plotly alone; `load_results` and Parquet need the `data` extra.

`report.EXTRA_OF` says which extra brings each optional package, and its error
messages name that extra; pyproject.toml must agree. `nox -s standalone` proves
each extra alone in a fresh venv; these check the same seams in this one.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from llem_dispatch.report import EXTRA_OF, render_report, require_extra
from tests.conftest import make_quickstart_results

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def _extras() -> dict[str, set[str]]:
    """Each extra's requirement names, with `llem-dispatch[a,b]` expanded."""
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    # A requirement's name (with its extras) ends where its version or marker begins.
    names = {
        extra: [re.split(r"[<>=!~; ]", r)[0] for r in reqs] for extra, reqs in declared.items()
    }

    def expand(extra: str) -> set[str]:
        out: set[str] = set()
        for name in names[extra]:
            if name.startswith("llem-dispatch["):
                for inner in name.removeprefix("llem-dispatch[").rstrip("]").split(","):
                    out |= expand(inner.strip())
            else:
                out.add(name.lower())
        return out

    return {extra: expand(extra) for extra in names}


def test_each_package_is_in_the_extra_its_errors_name() -> None:
    extras = _extras()
    for package, extra in EXTRA_OF.items():
        assert package in extras[extra], f"{package} is not in the `{extra}` extra"
    assert extras["report"] == {"plotly"}, "the report needs plotly alone"
    assert extras["data"] == {"pandas", "pyarrow"}


def test_analysis_is_still_everything_it_brought() -> None:
    """`pip install 'llem-dispatch[analysis]'` keeps working: the union of both."""
    extras = _extras()
    assert (
        extras["analysis"]
        == extras["report"] | extras["data"]
        == {
            "pandas",
            "plotly",
            "pyarrow",
        }
    )


@pytest.mark.parametrize(
    ("module", "extra"),
    [("plotly.graph_objects", "report"), ("pandas", "data"), ("pyarrow", "data")],
)
def test_a_missing_package_names_its_extra(
    module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(
        ModuleNotFoundError, match=re.escape(f"pip install 'llem-dispatch[{extra}]'")
    ):
        require_extra(module, "this")


async def test_the_report_renders_without_pandas_or_pyarrow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("plotly", reason="the `report` extra is not installed")
    results = await make_quickstart_results(tmp_path / "qs")
    for name in ("pandas", "pyarrow"):
        monkeypatch.setitem(sys.modules, name, None)
    page = render_report(results)
    assert 'id="llem-report-data"' in page


async def test_the_report_without_plotly_names_the_report_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = await make_quickstart_results(tmp_path / "qs")
    monkeypatch.setitem(sys.modules, "plotly", None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("llem-dispatch[report]")):
        render_report(results)
