"""Container side of the llem-dispatch protocol, for any image with python3.

Stdlib only, and standalone: the runners run this one file by path (the package
is not imported) or mount it read-only into an image that lacks llem-dispatch.
Usage::

    python3 /path/to/llem_dispatch/container.py pkg.module:function
    python3 /opt/llem/llem_container.py pkg.module:function
    python -m llem_dispatch.container pkg.module:function

It reads the config from $LLEM_CONFIG_PATH, loads secrets from
$LLEM_SECRETS_PATH into the environment, imports the function and, when
$LLEM_GO_PATH is set (a prestarted run held at its gate), waits until that
file exists (blocked on the $LLEM_GO_FIFO the host writes to as it opens the gate,
else polling) before it calls `function(config)` (the GPU is not the run's
until then: touch nothing on it at import time). It writes
its return value (a JSON-able dict, or an object with `model_dump()`) to
$LLEM_RESULT_PATH atomically. On any exception it writes
{"type", "message", "traceback"} to $LLEM_ERROR_PATH and exits 1.

Prepare phase: a generator function splits its work at its `yield`s. Its body up
to the first `yield` is the prepare part, run BEFORE the gate (host-side only:
imports, weights into host memory, tokenizer, data; nothing on the GPU, which
the previous experiment is still measuring on); after the gate it resumes. An
optional second `yield` marks the start of its first measured work; its
`return` value is the result::

    def run(config):
        weights = load_to_host_memory(config)      # prepare: before the gate
        yield                                      # ready: wait for the GPU
        model = to_gpu(weights); warm_up(model)    # the GPU is this run's now
        yield                                      # (optional) measuring starts
        return measure(model)

It appends its marks (`start`, `ready`, `go`, `work`, `done`: wall-clock seconds) as
JSON lines to $LLEM_MARKS_PATH, which any experiment may append a `work` mark to.

Quiet window: just before the measured part (the second `yield`'s, else the whole
call after the gate) it marks `quiet` and waits until $LLEM_QUIET_PATH exists: the
host writes it once the preparing runs beside it are paused (the study's
`prepare_during_measurement`). The measured window lasts until `done`. Any program
may do the same: append `{"mark": "quiet", "t": ...}`, wait for the file.
"""

from __future__ import annotations

import dis
import importlib
import inspect
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any

EXIT_FAILURE = 1
EXIT_USAGE = 2
#: How often a run held at its gate looks for the go file (seconds).
GATE_POLL_S = 0.002
#: How long a run waits for its quiet window before it measures anyway (seconds).
QUIET_WAIT_S = 120.0


def _atomic_write_json(path: str, data: Any) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, allow_nan=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_target(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target must look like 'package.module:function', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj


def _wait_at_gate() -> None:
    """Block until the go file exists, if this run was prestarted (LLEM_GO_PATH)."""
    path = os.environ.get("LLEM_GO_PATH")
    if not path:
        return
    fifo = os.environ.get("LLEM_GO_FIFO")
    if fifo and not os.path.exists(path):
        # Blocks, using no CPU, until the host writes a line when it opens the gate.
        try:
            with open(fifo, "rb") as handle:
                handle.readline()
        except OSError as exc:
            print(f"llem-container: gate FIFO unusable ({exc}); polling", file=sys.stderr)
    while not os.path.exists(path):
        time.sleep(GATE_POLL_S)


def _wait_for_quiet() -> None:
    """Ask the host for a quiet window (mark `quiet`) and wait until it grants it.

    Bounded: a host that never answers costs `QUIET_WAIT_S`, then it measures
    anyway and says so. Without $LLEM_QUIET_PATH (an older host) it asks nothing.
    """
    path = os.environ.get("LLEM_QUIET_PATH")
    if not path:
        return
    _mark("quiet")
    deadline = time.monotonic() + float(os.environ.get("LLEM_QUIET_WAIT_S", QUIET_WAIT_S))
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            print("llem-container: no quiet window granted; measuring anyway", file=sys.stderr)
            return
        time.sleep(GATE_POLL_S)


def _mark(name: str, **fields: Any) -> None:
    """Append `{"mark": name, "t": now}` to $LLEM_MARKS_PATH (best effort: timing only)."""
    path = os.environ.get("LLEM_MARKS_PATH")
    if not path:
        return
    line = json.dumps({"mark": name, "t": time.time(), **fields})
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError as exc:
        print(f"llem-container: could not write mark {name}: {exc}", file=sys.stderr)


def _rss_bytes() -> int | None:
    """This process's resident memory (Linux), reported with the `ready` mark."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _call(function: Any, config: Any, target: str) -> Any:
    """Call the experiment, its prepare part (a generator's) before the gate."""
    if not inspect.isgeneratorfunction(function):
        _mark("ready", rss_bytes=_rss_bytes())
        _wait_at_gate()
        _mark("go")
        _wait_for_quiet()
        return function(config)
    steps = function(config)
    try:
        next(steps)
    except StopIteration as stop:
        raise TypeError(
            f"{target} is a generator that returned before its first `yield`: "
            "yield once when prepared (before any GPU work)"
        ) from stop
    _mark("ready", rss_bytes=_rss_bytes())
    _wait_at_gate()
    _mark("go")
    # One `yield` in its code: all it does after the gate is measured, so the quiet
    # window opens now; with two, at the second (its `work` mark).
    measured_from_go = _yield_sites(function) < 2
    if measured_from_go:
        _wait_for_quiet()
    try:
        next(steps)  # after the gate, up to the measured part (or the end)
    except StopIteration as stop:
        return stop.value
    if not measured_from_go:
        _wait_for_quiet()
    _mark("work")
    try:
        next(steps)
    except StopIteration as stop:
        return stop.value
    steps.close()
    raise TypeError(f"{target} yielded more than twice (prepared, then measuring)")


def _yield_sites(function: Any) -> int:
    """How many `yield`s a generator function's own code has (not its nested ones')."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    if code is None:
        return 0
    return sum(1 for ins in dis.get_instructions(code) if ins.opname == "YIELD_VALUE")


def _to_jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def _load_secrets() -> None:
    path = os.environ.get("LLEM_SECRETS_PATH")
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for key, value in json.load(handle).items():
                os.environ.setdefault(str(key), str(value))


def main(argv: list[str] | None = None) -> int:
    """Run `module:function` under the protocol; return the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in {"-h", "--help"}:
        print(__doc__, file=sys.stderr)
        return EXIT_USAGE
    config_path = os.environ.get("LLEM_CONFIG_PATH")
    result_path = os.environ.get("LLEM_RESULT_PATH")
    if not config_path or not result_path:
        print(
            "llem-container: LLEM_CONFIG_PATH and LLEM_RESULT_PATH must be set "
            "(run this under llem-dispatch)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    error_path = os.environ.get("LLEM_ERROR_PATH") or result_path.replace(
        "_result.json", "_error.json"
    )
    _mark("start")
    try:
        _load_secrets()
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        function = _load_target(args[0])
        result = _to_jsonable(_call(function, config, args[0]))
        _mark("done")  # its work on the GPU is over: the cooldown may count from here
        if not isinstance(result, dict):
            raise TypeError(
                f"{args[0]} returned {type(result).__name__}; it must return a dict "
                "(or a pydantic model)"
            )
        _atomic_write_json(result_path, result)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the payload
        payload = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
        traceback.print_exc()
        try:
            _atomic_write_json(error_path, payload)
        except OSError as write_exc:
            print(f"llem-container: could not write {error_path}: {write_exc}", file=sys.stderr)
        if isinstance(exc, KeyboardInterrupt):
            return 130
        return EXIT_FAILURE
    return 0


def _import_from_cwd_not_here() -> None:
    """Run by path, Python puts this file's folder first on sys.path, not the cwd.

    That folder may be the llem_dispatch package itself, whose modules (`models`,
    `errors`, ...) would then shadow the experiment's: drop it. `_load_target`
    puts the cwd first, as `python -m` would have.
    """
    here = os.path.dirname(os.path.realpath(__file__))
    if sys.path and os.path.realpath(sys.path[0] or os.curdir) == here:
        del sys.path[0]


if __name__ == "__main__":
    _import_from_cwd_not_here()
    sys.exit(main())
