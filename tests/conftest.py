"""Shared fixtures: the real Docker daemon (or a clear skip), test images, label cleanup."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BUSYBOX_IMAGE = os.environ.get("LLEM_TEST_BUSYBOX_IMAGE", "llem-test/busybox:latest")
PYTHON_IMAGE = os.environ.get("LLEM_TEST_PYTHON_IMAGE", "llem-test/python:bookworm")
TEST_LABEL = "llem.test"
REPO_ROOT = Path(__file__).resolve().parent.parent


def _docker_problem() -> str | None:
    """None when the daemon answers and the test images exist, else why not."""
    try:
        proc = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"docker CLI unusable: {exc}"
    if proc.returncode != 0:
        return f"Docker daemon not reachable: {proc.stderr.strip()[:200]}"
    for image in (BUSYBOX_IMAGE, PYTHON_IMAGE):
        probe = subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, timeout=15, check=False
        )
        if probe.returncode != 0:
            return f"test image {image} missing (build it with `bash .ci/setup-docker.sh`)"
    return None


_PROBLEM: str | bool | None = False


def docker_problem() -> str | None:
    global _PROBLEM  # noqa: PLW0603 - probed once per session
    if _PROBLEM is False:
        _PROBLEM = _docker_problem()
    assert _PROBLEM is not True
    return _PROBLEM


def _ray_problem() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "Ray is not installed (pip install -e '.[dev,ray]')"
    return None


def _slurm_problem() -> str | None:
    """None when Slurm's controller answers and a node is up, else why not."""
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, check=False
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        return f"Slurm unusable here: {exc} (run `bash .ci/setup-slurm.sh` as root)"
    if proc.returncode != 0:
        return f"Slurm does not answer: {proc.stderr.strip()[:200]}"
    if not {"idle", "mixed", "allocated"} & set(proc.stdout.split()):
        return f"no Slurm node is up ({proc.stdout.strip() or 'none'})"
    return None


def _mark_slurm_tests(items: list[pytest.Item]) -> None:
    needs_slurm = [item for item in items if item.get_closest_marker("slurm")]
    if not needs_slurm or (problem := _slurm_problem()) is None:
        return
    if os.environ.get("LLEM_REQUIRE_SLURM") == "1":
        # In CI a missing Slurm must fail the Slurm tests, never skip them.
        for item in needs_slurm:
            item.add_marker(pytest.mark.usefixtures("_slurm_required_but_missing"))
        return
    for item in needs_slurm:
        item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture
def _slurm_required_but_missing() -> None:
    pytest.fail(f"LLEM_REQUIRE_SLURM=1 but {_slurm_problem()}")


#: The made-up CDI spec .ci/setup-docker.sh installs: its kind and its four fake GPU UUIDs.
CDI_TEST_SPEC = REPO_ROOT / ".ci" / "cdi" / "llem-test-gpu.yaml"
CDI_TEST_KIND = "llem.test/gpu"
#: Podman's Docker-compatible API as .ci/setup-podman.sh serves it (5.4), and an old 4.3.
PODMAN_URL = os.environ.get("LLEM_TEST_PODMAN_URL", "unix:///run/llem-podman/podman.sock")
PODMAN43_URL = os.environ.get("LLEM_TEST_PODMAN43_URL", "unix:///run/llem-podman43/podman.sock")


def cdi_test_uuids() -> list[str]:
    """The fake GPU UUIDs the test spec names (in its order)."""
    import yaml

    spec = yaml.safe_load(CDI_TEST_SPEC.read_text())
    return [device["name"] for device in spec["devices"]]


def _cdi_problem() -> str | None:
    """None when the daemon has CDI on and reads the test spec, else why not."""
    if (problem := docker_problem()) is not None:
        return problem
    proc = subprocess.run(
        ["docker", "info", "--format", "{{json .CDISpecDirs}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    dirs = json.loads(proc.stdout or "null") if proc.returncode == 0 else None
    if not dirs:
        return "the Docker daemon has CDI off (daemon.json features.cdi; .ci/setup-docker.sh)"
    from llem_dispatch._cdi import read_specs

    if read_specs(dirs).missing(CDI_TEST_KIND, cdi_test_uuids()):
        return f"no CDI spec of kind {CDI_TEST_KIND} in {dirs} (.ci/setup-docker.sh writes it)"
    return None


def ping(url: str, timeout: float = 5.0) -> str | None:
    """None when an engine API answers /_ping on the unix socket `url`, else why not."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(url.removeprefix("unix://"))
        sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
        reply = sock.recv(256)
    except OSError as exc:
        return f"nothing answers on {url}: {exc}"
    finally:
        sock.close()
    return None if b"200 OK" in reply else f"{url} answered {reply[:60]!r}"


def _podman_problem() -> str | None:
    return ping(PODMAN_URL) and f"Podman: {ping(PODMAN_URL)} (run `bash .ci/setup-podman.sh`)"


def _gate(items: list[pytest.Item], marker: str, problem: Any, require_env: str) -> None:
    """Skip the tests carrying `marker` when `problem()` says why; fail them under require_env."""
    marked = [item for item in items if item.get_closest_marker(marker)]
    if not marked or (why := problem()) is None:
        return
    if os.environ.get(require_env) == "1":
        mark = pytest.mark.usefixtures("_required_but_missing")
        for item in marked:
            item.stash[_MISSING] = f"{require_env}=1 but {why}"
            item.add_marker(mark)
        return
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=why))


_MISSING = pytest.StashKey[str]()


@pytest.fixture
def _required_but_missing(request: pytest.FixtureRequest) -> None:
    pytest.fail(request.node.stash[_MISSING])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _mark_browser_tests(items)
    _mark_slurm_tests(items)
    _gate(items, "cdi", _cdi_problem, "LLEM_REQUIRE_CDI")
    _gate(items, "podman", _podman_problem, "LLEM_REQUIRE_PODMAN")
    needs_ray = [item for item in items if item.get_closest_marker("ray")]
    if needs_ray and (ray_problem := _ray_problem()) is not None:
        if os.environ.get("LLEM_REQUIRE_RAY") == "1":
            # In CI a missing Ray must fail the cluster tests, never skip them.
            fail = pytest.mark.usefixtures("_ray_required_but_missing")
            for item in needs_ray:
                item.add_marker(fail)
        else:
            for item in needs_ray:
                item.add_marker(pytest.mark.skip(reason=ray_problem))
    needs_docker = [item for item in items if item.get_closest_marker("docker")]
    if not needs_docker:
        return
    problem = docker_problem()
    if problem is None:
        return
    if os.environ.get("LLEM_REQUIRE_DOCKER") == "1":
        # In CI a missing daemon must fail the run, never skip it.
        for item in needs_docker:
            item.add_marker(pytest.mark.usefixtures("_docker_required_but_missing"))
        return
    skip = pytest.mark.skip(
        reason=f"{problem}. Integration tests need a real Docker Engine: "
        "run `bash .ci/setup-docker.sh` (Debian, root) or start dockerd."
    )
    for item in needs_docker:
        item.add_marker(skip)


@pytest.fixture
def _ray_required_but_missing() -> None:
    pytest.fail(f"LLEM_REQUIRE_RAY=1 but {_ray_problem()}")


@pytest.fixture
def _docker_required_but_missing() -> None:
    pytest.fail(f"LLEM_REQUIRE_DOCKER=1 but {docker_problem()}")


def labelled_containers(label: str, *, running_only: bool = False) -> list[str]:
    """Ids of containers carrying `label` ('key=value'); all states unless running_only."""
    proc = subprocess.run(
        ["docker", "ps", "-q" if running_only else "-aq", "--filter", f"label={label}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.stdout.split()


#: Where a test not marked `docker` finds "the daemon": nothing. A test that needs a
#: real daemon without saying so fails here on every machine, instead of passing where
#: a daemon happens to run and being skipped nowhere.
UNMARKED_DOCKER_HOST = "unix:///nonexistent/llem-test-not-marked-docker.sock"
_CALLERS_DOCKER_HOST = pytest.StashKey[str | None]()


@pytest.fixture(autouse=True)
def _docker_only_for_marked_tests(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Point DOCKER_HOST nowhere for tests without the `docker` marker (their
    subprocesses inherit it); a test that sets its own DOCKER_HOST is unaffected."""
    if request.node.get_closest_marker("docker") is None:
        request.node.stash[_CALLERS_DOCKER_HOST] = os.environ.get("DOCKER_HOST")
        monkeypatch.setenv("DOCKER_HOST", UNMARKED_DOCKER_HOST)


def require_docker(request: pytest.FixtureRequest) -> None:
    """For tests parametrized over runners: mark the docker variant, skip or fail as usual."""
    request.applymarker(pytest.mark.docker)
    if os.environ.get("DOCKER_HOST") == UNMARKED_DOCKER_HOST:
        # The autouse guard ran before this variant declared itself: undo it
        # (monkeypatch restores the caller's value at teardown either way).
        callers = request.node.stash.get(_CALLERS_DOCKER_HOST, None)
        if callers is None:
            del os.environ["DOCKER_HOST"]
        else:
            os.environ["DOCKER_HOST"] = callers
    problem = docker_problem()
    if problem and os.environ.get("LLEM_REQUIRE_DOCKER") != "1":
        pytest.skip(problem)
    elif problem:
        pytest.fail(f"LLEM_REQUIRE_DOCKER=1 but {problem}")


def use_podman(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """For tests parametrized over engines: the Podman variant. Marks it `podman`, skips
    or fails (LLEM_REQUIRE_PODMAN=1) without Podman, and points DOCKER_HOST (the docker
    CLI the test helpers call) at Podman's socket for the test. Returns that URL."""
    request.applymarker(pytest.mark.podman)
    problem = _podman_problem()
    if problem and os.environ.get("LLEM_REQUIRE_PODMAN") == "1":
        pytest.fail(f"LLEM_REQUIRE_PODMAN=1 but {problem}")
    elif problem:
        pytest.skip(problem)
    monkeypatch.setenv("DOCKER_HOST", PODMAN_URL)
    return PODMAN_URL


def fail_on_leaks(label: str) -> None:
    """Fail if containers carrying `label` are left (on DOCKER_HOST's engine); remove them."""
    leaked = labelled_containers(label)
    if leaked:
        subprocess.run(
            ["docker", "rm", "-f", *leaked], capture_output=True, timeout=60, check=False
        )
        pytest.fail(f"containers left behind: {leaked}")


@pytest.fixture
def test_labels(request: pytest.FixtureRequest) -> dict[str, str]:
    """Labels for every container a test creates; cleanup and leak checks use them."""
    return {TEST_LABEL: "1", "llem.test.node": request.node.nodeid[-60:]}


@pytest.fixture
def no_leaked_containers(test_labels: dict[str, str]) -> Iterator[None]:
    """Fail the test if any container of ours is left; force-remove them either way."""
    label = f"llem.test.node={test_labels['llem.test.node']}"
    yield
    leaked = labelled_containers(label)
    if leaked:
        subprocess.run(
            ["docker", "rm", "-f", *leaked], capture_output=True, timeout=60, check=False
        )
        pytest.fail(f"containers left behind: {leaked}")


@pytest.fixture
def exchange_base(tmp_path: Path) -> Path:
    """Exchange dirs go under the test's tmp_path so nothing is left in /tmp."""
    base = tmp_path / "exchange"
    base.mkdir()
    return base


# -- headless Chromium (report tests) and CI artifacts -----------------------------

ARTIFACTS_DIR = Path(os.environ.get("LLEM_ARTIFACTS_DIR", REPO_ROOT / "artifacts"))
_artifacts: list[Path] = []


def chromium_binary() -> str | None:
    """Debian's `chromium` (or another Chromium-based browser on PATH)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def _mark_browser_tests(items: list[pytest.Item]) -> None:
    needs = [item for item in items if item.get_closest_marker("browser")]
    if not needs or chromium_binary() is not None:
        return
    if os.environ.get("LLEM_REQUIRE_BROWSER") == "1":
        # In CI the report must be opened in a real browser, never skipped.
        for item in needs:
            item.add_marker(pytest.mark.usefixtures("_browser_required_but_missing"))
        return
    skip = pytest.mark.skip(
        reason="headless Chromium not found on PATH (Debian: `apt-get install -y chromium`); "
        "the report is not opened in a browser"
    )
    for item in needs:
        item.add_marker(skip)


@pytest.fixture
def _browser_required_but_missing() -> None:
    pytest.fail("LLEM_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install -y chromium)")


@pytest.fixture
def artifact_path() -> Any:
    """`artifact_path(name)`: a path under the artifacts dir, listed at the end of the run."""

    def make(name: str) -> Path:
        ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS_DIR / name
        _artifacts.append(path)
        return path

    return make


def pytest_terminal_summary(terminalreporter: Any) -> None:
    kept = [p for p in _artifacts if p.exists()]
    if kept:
        terminalreporter.section("artifacts")
        for path in kept:
            terminalreporter.write_line(f"artifact kept: {path}")


# -- a quickstart results dir without Docker (report and results tests) -------------

QUICKSTART_STUDY = REPO_ROOT / "examples" / "quickstart" / "study.yaml"


async def make_quickstart_results(
    out: Path, *, trouble: bool = False, gpus_per_experiment: int = 1, gap_s: float = 0.0
) -> Path:
    """The quickstart study (its parameters and `report:`) run by a FakeRunner into `out`.

    With `trouble`: one attempt hits a transient daemon error and is retried, one
    experiment reports its own failure, and one ends with an infrastructure error.
    """
    import anyio

    from llem_dispatch import (
        DockerOOMError,
        DockerUnavailableError,
        ExperimentFailure,
        GpuPool,
        RetryPolicy,
        compute_config_hash,
        load_study,
        run_study,
    )
    from llem_dispatch.testing import FakeRunner

    study = load_study(QUICKSTART_STUDY).model_copy(
        update={"gpus_per_experiment": gpus_per_experiment, "experiment_gap_s": gap_s}
    )
    flaky_left = [1]

    async def handler(config: dict[str, Any], gpu_ids: tuple[str, ...]) -> Any:
        size, dtype, batch = config["size"], config["dtype"], config["batch"]
        await anyio.sleep(0.01 + 0.04 * size / 128)
        if trouble and (size, dtype, batch) == (64, "float32", 1) and flaky_left:
            flaky_left.pop()
            raise DockerUnavailableError("Docker daemon restarting")
        if trouble and (size, dtype, batch) == (128, "float64", 4):
            return ExperimentFailure(
                type="MemoryError",
                message="matrix too large for this GPU",
                config_hash=compute_config_hash(config),
            )
        if trouble and (size, dtype, batch) == (128, "float32", 4):
            raise DockerOOMError("killed by the OOM killer", exchange_dir=out / "exchange" / "x")
        gflops = (20 + size / 2) * (2 if dtype == "float32" else 1) * (1 + 0.1 * batch)
        seconds = 2.0 * size**3 * batch / (gflops * 1e9)
        return {
            "impl": "fake",
            "size": size,
            "dtype": dtype,
            "batch": batch,
            "time_per_op_ms": seconds / batch * 1e3,
            "gflops": gflops,
            "times_s": [seconds, seconds * 1.1, seconds * 0.9],
            "energy_j": None,
            "energy_source": "unavailable: fake runner",
        }

    await run_study(
        study,
        out,
        runner=FakeRunner(handler),
        pool=GpuPool.virtual_devices(4, cooldown_s=gap_s),
        retry_policy=RetryPolicy(max_attempts=2, base_delay_s=0.01, jitter=False),
        reap_orphans=False,
    )
    return out


def run_in_pty(
    *args: str, timeout: float = 90, columns: int = 110, lines: int = 30
) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal; return its exit code and the text it drew."""
    primary, secondary = pty.openpty()
    size = {"COLUMNS": str(columns), "LINES": str(lines), "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llem_dispatch.cli", *args],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, **size},
    )
    os.close(secondary)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    data = os.read(primary, 65536)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(primary)
        proc.wait(timeout=30)
    drawn = b"".join(chunks).decode("utf-8", errors="replace")
    # Colours and cursor moves out: what remains is the text the terminal showed.
    return proc.returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
