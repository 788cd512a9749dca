"""The single entry point for checks: `nox -s tests lint typecheck standalone` (and `bench`)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "standalone"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = ["3.11"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit and integration tests (integration needs a Docker daemon; see README)."""
    session.install("-e", ".[dev,ray,analysis]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "examples", "benchmarks", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "src")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: each prints its table and ratios (`-- --smoke` for a quick pass)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "benchmarks", *session.posargs)


#: `standalone` installs the wheel alone, then with each extra alone (`analysis` is
#: report + data); `nox -s "standalone-3.11(report)"` runs one.
EXTRAS = ["base", "report", "data", "analysis", "nvml", "ray"]


@nox.session(python=PYTHON, venv_backend="venv", reuse_venv=False)
@nox.parametrize("extra", EXTRAS, ids=EXTRAS)
def standalone(session: nox.Session, extra: str) -> None:
    """The wheel in a fresh venv with no extra, or with one extra alone; no test tools.

    Every module imports (only a missing extra's own modules may be missing). The
    quickstart runs on the local runner; from its results, what the extra is for works
    (the report with plotly alone, `load_results` and Parquet with `data`, the Ray
    placement, NVML) and what it is not for fails naming the extra to install
    (.ci/standalone_check.py). The base install also runs `--help` and `doctor`.
    """
    root = Path(__file__).parent.resolve()
    wheels = Path(session.create_tmp()) / "wheels"
    session.run(
        "python", "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(root)
    )
    (wheel,) = glob.glob(str(wheels / "llem_dispatch-*.whl"))
    session.install(wheel if extra == "base" else f"{wheel}[{extra}]")
    check = ["python", str(root / ".ci" / "standalone_check.py")]
    if extra == "base":
        session.run(
            "python", "-c", "import llem_dispatch; print(llem_dispatch.__name__, 'imports')"
        )
        session.run("llem-dispatch", "--help", silent=True)
        # doctor: exit 0 or 1 (a failed check, e.g. no daemon) but never a crash.
        session.run("llem-dispatch", "doctor", success_codes=[0, 1])
    else:
        check += ["--extra", extra]
    work = Path(session.create_tmp()) / "quickstart"
    session.chdir(str(root))
    session.run(
        "llem-dispatch",
        "run",
        "examples/quickstart/study.yaml",
        "--runner",
        "local",
        "--results",
        str(work),
        env={"PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "")},
    )
    session.run(*check, "--results", str(work))
