"""`python -m benchmarks [--smoke] [--only NAME ...]`: run the benchmarks, print tables.

Each benchmark prints its table, the ratio that matters against a baseline
measured in the same run, and PASS/MISS against its target. A MISS never
fails the process: the exit status is non-zero only when a benchmark crashed
(or left containers behind, which is a bug).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import anyio

from benchmarks import BENCHMARKS, load
from benchmarks._common import (
    Context,
    Verdict,
    docker_problem,
    environment,
    quiet_logs,
    remove_labelled,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: the whole suite in well under a minute"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only this benchmark (repeatable, or comma-separated): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name in BENCHMARKS:
            print(f"{name}: {load(name).TITLE}")
        return 0
    selected = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = [n for n in selected if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    names = [n for n in BENCHMARKS if not selected or n in selected]
    quiet_logs()
    mode = "smoke" if args.smoke else "full"
    print(f"llem-dispatch benchmarks ({mode}): {', '.join(names)}")
    print(f"  {environment()}")
    modules = {name: load(name) for name in names}
    problem = docker_problem() if any(m.NEEDS_DOCKER for m in modules.values()) else None
    crashed: list[str] = []
    verdicts: list[Verdict] = []
    suite_start = time.perf_counter()
    for index, (name, module) in enumerate(modules.items(), 1):
        print()
        print(f"=== [{index}/{len(modules)}] {name}: {module.TITLE} ===")
        start = time.perf_counter()
        workdir = Path(tempfile.mkdtemp(prefix=f"llem-bench-{name}-"))
        ctx = Context(name=name, smoke=args.smoke, workdir=workdir)
        try:
            if module.NEEDS_DOCKER and problem is not None:
                raise RuntimeError(f"needs Docker: {problem}")
            anyio.run(module.run, ctx)
        except Exception:
            crashed.append(name)
            print(f"  CRASH  {name}:")
            traceback.print_exc(file=sys.stdout)
        finally:
            if module.NEEDS_DOCKER and problem is None:
                left = remove_labelled()
                if left:
                    crashed.append(f"{name} (left {len(left)} containers)")
                    print(f"  CRASH  {len(left)} labelled container(s) were left behind: {left}")
            shutil.rmtree(workdir, ignore_errors=True)
        verdicts += ctx.verdicts
        print(f"  ({name}: {time.perf_counter() - start:.1f} s)")

    print()
    print(f"=== summary ({mode}, {time.perf_counter() - suite_start:.1f} s) ===")
    for v in verdicts:
        print(f"  {v.word}  {v.bench}: {v.metric} = {v.value} (target {v.target})")
    passed = sum(v.passed for v in verdicts)
    print(f"  {passed}/{len(verdicts)} targets met; crashed: {', '.join(crashed) or 'none'}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
