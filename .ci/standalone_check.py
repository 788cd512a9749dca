"""The base package and each extra stand alone: run by `nox -s standalone`, inside a venv
holding only the wheel, its declared dependencies and at most one extra.

`python standalone_check.py [--extra NAME] [--results DIR]`

Imports every module of llem_dispatch: a module may fail to import only for want of
a package of an extra that is not installed (EXTRAS); anything else missing is a
dependency that pyproject.toml forgot, which only a hand-fed machine would hide.
Checks that the extra's packages are here and no other extra's or test tool's are,
so the check proves what it claims. Then, with the results dir of a quickstart run,
what each extra is for works where it is installed and, where it is not, fails
naming the extra to install: the HTML report (`report`: plotly alone),
`load_results`, `load_stats` and Parquet (`data`: pandas, pyarrow), the Ray
placement (`ray`), NVML (`nvml`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The top-level modules each extra of pyproject.toml brings; `analysis` is report + data.
EXTRAS: dict[str, frozenset[str]] = {
    "report": frozenset({"plotly"}),
    "data": frozenset({"pandas", "pyarrow"}),
    "nvml": frozenset({"pynvml"}),
    "ray": frozenset({"ray"}),
}
EXTRAS["analysis"] = EXTRAS["report"] | EXTRAS["data"]
OPTIONAL = frozenset().union(*EXTRAS.values())
#: The dev extra and the examples' packages: never part of a user's install.
TEST_TOOLS = ["torch", "transformers", "pytest", "trio", "nox"]


class Checks:
    """Collects what went wrong, printing each check as it runs."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.passed = 0

    def expect(self, ok: bool, what: str, detail: str = "") -> None:
        if ok:
            self.passed += 1
            print(f"  ok    {what}")
        else:
            self.problems.append(f"{what}{': ' + detail if detail else ''}")
            print(f"  FAIL  {what}{': ' + detail if detail else ''}", file=sys.stderr)

    def step(self, check: Callable[..., None], *args: Any) -> None:
        """Run one group of checks; a crash in it is a problem, not the end of the run."""
        try:
            check(*args)
        except Exception as exc:  # noqa: BLE001 - reported with the others
            self.expect(False, check.__name__, f"{type(exc).__name__}: {exc}"[:300])

    def names_extra(self, call: Callable[[], Any], extra: str, what: str) -> None:
        """`call` must fail, with a message that says `pip install 'llem-dispatch[extra]'`."""
        hint = f"llem-dispatch[{extra}]"
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any failure is judged by its message
            text = f"{exc} {getattr(exc, 'fix_suggestion', '') or ''}"
            self.expect(hint in text, f"{what} without `{extra}` names it", text[:300])
        else:
            self.expect(False, f"{what} without `{extra}` fails", "it did not")

    def cli(self, args: list[str], code: int, what: str, needle: str = "") -> None:
        proc = subprocess.run(
            ["llem-dispatch", *args], capture_output=True, text=True, timeout=300, check=False
        )
        said = proc.stdout + proc.stderr
        ok = proc.returncode == code and needle in said
        self.expect(ok, what, f"exit {proc.returncode}, said {said.strip()[-300:]!r}")


def installed_as_claimed(extra: str | None, checks: Checks) -> None:
    brought = EXTRAS[extra] if extra else frozenset()
    absent = sorted(OPTIONAL - brought) + TEST_TOOLS
    if not brought & {"pandas", "pyarrow", "ray"}:
        absent.append("numpy")  # the statistics tests' reference, in `dev`
    present = [name for name in absent if importlib.util.find_spec(name) is not None]
    what = f"only the {extra} extra installed" if extra else "no extra installed"
    checks.expect(not present, what, f"{present} importable")
    if extra:
        missing = [name for name in sorted(brought) if importlib.util.find_spec(name) is None]
        checks.expect(not missing, f"the {extra} extra's packages installed", f"{missing} missing")


def every_module_imports(brought: frozenset[str], checks: Checks) -> None:
    import llem_dispatch

    problems = []
    names = [
        info.name
        for info in pkgutil.walk_packages(llem_dispatch.__path__, prefix="llem_dispatch.")
        if not info.name.endswith(".__main__")  # importing one runs the CLI
    ]
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            root = (exc.name or "").partition(".")[0]
            if root not in OPTIONAL - brought:
                problems.append(f"{name}: imports {exc.name!r}, which pyproject does not declare")
        except ImportError as exc:
            problems.append(f"{name}: {exc}")
    for attr in llem_dispatch.__all__:
        try:
            getattr(llem_dispatch, attr)
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] not in OPTIONAL - brought:
                problems.append(f"llem_dispatch.{attr}: needs undeclared {exc.name!r}")
    what = f"{len(names)} modules and {len(llem_dispatch.__all__)} exports import"
    checks.expect(not problems, what, "; ".join(problems))


def report_works(results: Path, out: Path, checks: Checks) -> None:
    from llem_dispatch.report import render_report

    page = render_report(results)
    checks.expect(
        'id="llem-report-data"' in page and "Plotly" in page,
        f"render_report: {len(page) // 1024} KiB of HTML with plotly.js and the data",
    )
    checks.cli(["report", str(results), "-o", str(out / "r.html")], 0, "`report` exits 0")


def report_refused(results: Path, out: Path, checks: Checks) -> None:
    from llem_dispatch.report import render_report

    checks.names_extra(lambda: render_report(results), "report", "render_report")
    args = ["report", str(results), "-o", str(out / "r.html")]
    checks.cli(args, 2, "`report` exits 2 naming the extra", "llem-dispatch[report]")


def data_works(results: Path, out: Path, checks: Checks) -> None:
    from llem_dispatch import load_results, load_stats
    from llem_dispatch.report import write_parquet

    frame = load_results(results)
    records = len(list((results / "records").glob("*.json")))
    checks.expect(
        len(frame) == records > 0 and str(frame["started_at"].dtype).startswith("datetime64"),
        f"load_results: {len(frame)} rows, typed timestamps",
        f"{len(frame)} rows for {records} records, started_at {frame['started_at'].dtype}",
    )
    checks.expect(len(load_stats(results)) > 0, "load_stats: one row per config")
    back = importlib.import_module("pandas").read_parquet(write_parquet(frame, out / "r.parquet"))
    checks.expect(list(back.columns) == list(frame.columns), "write_parquet round-trips")
    args = ["results", str(results), "--format", "parquet", "-o", str(out / "c.parquet")]
    checks.cli(args, 0, "`results --format parquet` exits 0")


def data_refused(results: Path, out: Path, checks: Checks) -> None:
    from llem_dispatch import load_results, load_stats

    checks.names_extra(lambda: load_results(results), "data", "load_results")
    checks.names_extra(lambda: load_stats(results), "data", "load_stats")
    args = ["results", str(results), "--format", "parquet", "-o", str(out / "c.parquet")]
    checks.cli(args, 2, "`results --format parquet` exits 2 naming the extra", "[data]")


def ray_works(checks: Checks) -> None:
    from llem_dispatch.dispatch.registry import placement_class

    checks.expect(placement_class("ray").__name__ == "RayPlacement", "the Ray placement loads")


def ray_refused(checks: Checks) -> None:
    from llem_dispatch.dispatch.registry import placement_class

    checks.names_extra(lambda: placement_class("ray"), "ray", "the Ray placement")


def nvml_works(checks: Checks) -> None:
    from llem_dispatch.gpu.discovery import nvml_inventory

    _, why = nvml_inventory()  # no GPU here is fine: NVML itself must be what answers
    checks.expect("not installed" not in why, f"NVML is asked ({why or 'devices found'})")


def nvml_refused(checks: Checks) -> None:
    from llem_dispatch.gpu.discovery import nvml_inventory

    devices, why = nvml_inventory()
    checks.expect(devices is None and "llem-dispatch[nvml]" in why, "NVML names its extra", why)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--extra", choices=sorted(EXTRAS), help="the one extra installed")
    parser.add_argument("--results", type=Path, help="a results dir (the quickstart's)")
    args = parser.parse_args()
    extra: str | None = args.extra
    brought = EXTRAS[extra] if extra else frozenset()
    checks = Checks()
    print(f"standalone: the wheel with {f'the {extra} extra' if extra else 'no extra'}")
    installed_as_claimed(extra, checks)
    every_module_imports(brought, checks)
    with tempfile.TemporaryDirectory(prefix="llem-standalone-") as tmp:
        out = Path(tmp)
        if args.results is not None:
            has = brought.issuperset
            report = report_works if has(EXTRAS["report"]) else report_refused
            data = data_works if has(EXTRAS["data"]) else data_refused
            checks.step(report, args.results, out, checks)
            checks.step(data, args.results, out, checks)
        checks.step(ray_works if "ray" in brought else ray_refused, checks)
        checks.step(nvml_works if "pynvml" in brought else nvml_refused, checks)
    print(f"{checks.passed} check(s) passed; {len(checks.problems)} problem(s)")
    return 1 if checks.problems else 0


if __name__ == "__main__":
    sys.exit(main())
