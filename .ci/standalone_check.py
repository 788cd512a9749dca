"""The base package stands alone: run inside a venv holding only the wheel and its
declared dependencies (no extras), by `nox -s standalone`.

Imports every module of llem_dispatch: a module may fail to import only for want of
an optional extra's package (named in OPTIONAL); anything else missing is a
dependency that pyproject.toml forgot, which only a hand-fed machine would hide.
Then checks that no optional or test package is installed here, so the check
proves what it claims.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys

#: Top-level modules of the extras (nvml, ray, analysis) and of the test tooling.
OPTIONAL = {"ray", "pandas", "plotly", "pyarrow", "pynvml"}
ABSENT = [*OPTIONAL, "torch", "transformers", "pytest", "trio", "nox", "numpy"]


def main() -> int:
    present = [name for name in ABSENT if importlib.util.find_spec(name) is not None]
    if present:
        print(f"not a bare install: {present} importable here", file=sys.stderr)
        return 1
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
            if root not in OPTIONAL:
                problems.append(f"{name}: imports {exc.name!r}, which pyproject does not declare")
        except ImportError as exc:
            problems.append(f"{name}: {exc}")
    for attr in llem_dispatch.__all__:
        try:
            getattr(llem_dispatch, attr)
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] not in OPTIONAL:
                problems.append(f"llem_dispatch.{attr}: needs undeclared {exc.name!r}")
    for line in problems:
        print(line, file=sys.stderr)
    print(
        f"imported {len(names)} modules and {len(llem_dispatch.__all__)} exports; "
        f"{len(problems)} problem(s)"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
