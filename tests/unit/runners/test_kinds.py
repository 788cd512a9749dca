"""The runner-kind registry: names, lazy built-ins, registration, the value grammar, auto."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from llem_dispatch.errors import ConfigError
from llem_dispatch.runners import (
    DockerRunner,
    LocalRunner,
    LocalRunnerKind,
    RunnerKind,
    RunnerOptions,
    get_runner_kind,
    register_runner_kind,
    runner_kinds,
)
from llem_dispatch.runners import kinds as registry
from llem_dispatch.runners.kinds import (
    choose_auto,
    decide_kind,
    find_runner_kind,
    known_runner_kinds,
    parse_runner_value,
    registered_names,
)
from llem_dispatch.study import Study, load_study, make_runner, resolve_runner

REPO = Path(__file__).resolve().parents[3]


class HostRunner(LocalRunner):
    runner_type = "hostproc"


class HostKind(LocalRunnerKind):
    """A kind registered at run time, the way a package would without entry points."""

    runner_class = HostRunner


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Names registered by the test, removed again afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        registry._registry.pop(name, None)
        registry._origins.pop(name, None)
        registry._instances.pop(name, None)


def test_builtins_are_dotted_paths_in_a_read_only_view() -> None:
    assert dict(known_runner_kinds) == {
        "docker": "llem_dispatch.runners.docker_kind:DockerRunnerKind",
        "local": "llem_dispatch.runners.local:LocalRunnerKind",
        "podman": "llem_dispatch.runners.podman_kind:PodmanRunnerKind",
    }
    assert {"docker", "local", "podman"} <= set(runner_kinds)
    with pytest.raises(TypeError):
        runner_kinds["apptainer"] = "x:Y"  # type: ignore[index]


def test_naming_a_kind_imports_nothing_heavy() -> None:
    # The docker kind's module is imported the first time `docker` is used, not before.
    code = (
        "import sys; from llem_dispatch.runners.kinds import get_runner_kind, registered_names; "
        "registered_names(); get_runner_kind('local'); "
        "assert 'llem_dispatch.runners.docker_kind' not in sys.modules; "
        "get_runner_kind('docker'); "
        "assert 'llem_dispatch.runners.docker_kind' in sys.modules"
    )
    env = {"PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_builtin_kinds_say_what_they_need() -> None:
    local, docker = get_runner_kind("local"), get_runner_kind("docker")
    assert (local.needs_image, local.needs_engine, local.gpu_request) == (False, False, "env")
    assert (docker.needs_image, docker.needs_engine, docker.gpu_request) == (
        True,
        True,
        "device_requests",
    )
    assert docker.reapable
    assert not local.reapable
    assert get_runner_kind("local") is local, "one instance per name"


def test_docker_kind_builds_from_plain_values() -> None:
    docker = get_runner_kind("docker")
    runner = docker.build(RunnerOptions(command=("true",), virtual=True, shm_size="64m"), "i:1")
    assert isinstance(runner, DockerRunner)
    assert (runner.image, runner.gpu_passthrough) == ("i:1", False)
    with pytest.raises(ConfigError, match="names no image"):
        docker.build(RunnerOptions(command=("true",)))


def test_register_a_class_and_a_dotted_path(registered: list[str]) -> None:
    registered += ["hostproc", "hostpath"]
    register_runner_kind("hostproc", HostKind)
    register_runner_kind("hostpath", f"{__name__}:HostKind")
    assert {"hostproc", "hostpath"} <= set(registered_names())
    assert isinstance(get_runner_kind("hostpath"), HostKind)
    assert get_runner_kind("hostpath").name == "hostpath"
    with pytest.raises(ValueError, match="already registered"):
        register_runner_kind("hostproc", HostKind)
    register_runner_kind("hostproc", LocalRunnerKind, clobber=True)
    assert type(get_runner_kind("hostproc")) is LocalRunnerKind
    for bad in ("auto", "", "a b", "x:y"):
        with pytest.raises(ValueError, match="cannot name a runner kind"):
            register_runner_kind(bad, HostKind)


def test_a_kind_that_cannot_load_is_a_config_error(registered: list[str]) -> None:
    registered += ["broken", "notakind"]
    register_runner_kind("broken", "no_such_module_llem:Kind")
    register_runner_kind("notakind", "llem_dispatch.runners.local:LocalRunner")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        get_runner_kind("broken")
    with pytest.raises(ConfigError, match="not a RunnerKind subclass"):
        get_runner_kind("notakind")


def test_unknown_names_list_the_registered_kinds_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        get_runner_kind("dokcer")
    assert "did you mean 'docker'?" in info.value.message
    assert "registered kinds: docker, local, podman; or auto" in info.value.message
    assert find_runner_kind("dokcer") is None
    assert find_runner_kind("docker") is get_runner_kind("docker")


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("local", ("local", None)),
        (" docker ", ("docker", None)),
        ("docker:ghcr.io/org/img:1.2", ("docker", "ghcr.io/org/img:1.2")),
        ("docker:localhost:5000/img", ("docker", "localhost:5000/img")),
        ("auto", ("auto", None)),
    ],
)
def test_runner_value_grammar(value: str, parsed: tuple[str, str | None]) -> None:
    assert parse_runner_value(value) == parsed


def test_runner_value_errors() -> None:
    with pytest.raises(ValueError, match="runs no image"):
        parse_runner_value("local:img:1")
    with pytest.raises(ValueError, match="did you mean 'local'"):
        parse_runner_value("locl")


def test_a_registered_kind_builds_the_study_runner(tmp_path: Path, registered: list[str]) -> None:
    registered.append("hostproc")
    register_runner_kind("hostproc", HostKind)
    study = Study.model_validate({"grid": {"x": [1]}, "function": "m:f", "image": "s:1"})
    spec = resolve_runner("hostproc", study, environ={})
    assert (spec.kind, spec.image, spec.source) == ("hostproc", None, "explicit")
    runner = make_runner(study, spec, study_dir=tmp_path)
    assert isinstance(runner, HostRunner)
    assert runner.cwd == tmp_path


def test_an_unknown_kind_in_a_study_is_located(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("name: s\nfunction: m:f\nrunner: dokcer\ngrid: {x: [1]}\n")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert f"{path}:3: runner:" in info.value.message
    assert "did you mean 'docker'?" in info.value.message


def test_auto_prefers_docker_with_an_image_and_a_daemon() -> None:
    with capture_logs() as logs:
        assert choose_auto(has_image=True, probe=lambda _k: True).name == "docker"
    assert logs == []


def test_auto_falls_back_to_local_and_says_why() -> None:
    with capture_logs() as logs:
        assert choose_auto(has_image=True, probe=lambda _k: False).name == "local"
    assert [e["event"] for e in logs] == ["runner_fallback"]
    assert logs[0]["message"] == (
        "No Docker daemon reachable: falling back to the local subprocess runner "
        "(experiments run on this host, not in containers)."
    )
    with capture_logs() as logs:
        assert choose_auto(has_image=False, probe=lambda _k: True).name == "local"
    assert logs[0]["message"].startswith("The study names no image for the docker runner")
    with capture_logs() as logs:
        assert decide_kind("auto", has_image=True, probe=lambda _k: False, quiet=True).name == (
            "local"
        )
    assert logs == []


def test_a_kind_without_an_engine_is_never_probed() -> None:
    asked: list[RunnerKind] = []

    def probe(kind: RunnerKind) -> bool:
        asked.append(kind)
        return False

    assert choose_auto(has_image=True, probe=probe, quiet=True).name == "local"
    assert [k.name for k in asked] == ["docker"]
