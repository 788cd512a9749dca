"""Behaviour both runners share, run against each: the real daemon and a real subprocess."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from llem_dispatch import (
    DockerContainerError,
    DockerRunner,
    ExperimentExitError,
    ExperimentFailure,
    ExperimentResult,
    LocalRunner,
    Runner,
)
from llem_dispatch.runners.podman import PodmanRunner
from tests.conftest import (
    BUSYBOX_IMAGE,
    PYTHON_IMAGE,
    fail_on_leaks,
    require_docker,
    use_podman,
)
from tests.integration.test_docker_runner import Recorder

pytestmark = pytest.mark.usefixtures("no_leaked_containers")

MakeRunner = Callable[..., Runner]


@pytest.fixture(params=["docker", "local", "podman"])
async def make(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    test_labels: dict[str, str],
    exchange_base: Path,
) -> AsyncIterator[MakeRunner]:
    kind = request.param
    if kind == "docker":
        require_docker(request)
    podman_url = use_podman(request, monkeypatch) if kind == "podman" else None
    made: list[Runner] = []

    def factory(script: str | None = None, *, function: str | None = None, **kwargs: Any) -> Runner:
        command = ["sh", "-c", script] if script is not None else None
        runner: Runner
        if kind in {"docker", "podman"}:
            runner = (PodmanRunner if podman_url else DockerRunner)(
                PYTHON_IMAGE if function else BUSYBOX_IMAGE,
                docker_host=podman_url,
                command=command,
                function=function,
                labels=test_labels,
                exchange_base=exchange_base,
                shm_size="64m",
                **kwargs,
            )
        else:
            runner = LocalRunner(command, function=function, exchange_base=exchange_base, **kwargs)
        made.append(runner)
        return runner

    yield factory
    for runner in made:
        await runner.aclose()
    if podman_url:
        fail_on_leaks(f"llem.test.node={test_labels['llem.test.node']}")


def kept(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.name.startswith("llem-"))


async def test_round_trip_and_cleanup(make: MakeRunner, exchange_base: Path) -> None:
    script = (
        'cfg=$(cat "$LLEM_CONFIG_PATH"); printf \'{"cfg": %s, "gpus": "%s"}\' "$cfg" '
        '"$LLEM_GPU_IDS" > "$LLEM_EXCHANGE_DIR/t"; mv "$LLEM_EXCHANGE_DIR/t" '
        '"$LLEM_RESULT_PATH"'
    )
    runner = make(script)
    result = await runner.run({"a": [1, 2]}, gpus=["1"] if runner.runner_type == "local" else None)
    assert isinstance(result, ExperimentResult)
    assert result.data["cfg"] == {"a": [1, 2]}
    assert result.runner.runner_type == runner.runner_type
    assert kept(exchange_base) == []


async def test_error_payload(make: MakeRunner, exchange_base: Path) -> None:
    script = (
        'echo progress; printf \'{"type": "KeyError", "message": "m"}\' > '
        '"$LLEM_EXCHANGE_DIR/${LLEM_CONFIG_HASH}_error.json"; exit 1'
    )
    outcome = await make(script).run({"b": 1})
    assert isinstance(outcome, ExperimentFailure)
    assert outcome.type == "KeyError"
    assert kept(exchange_base) == [Path(str(outcome.exchange_dir))]
    assert "progress" in Path(str(outcome.log_path)).read_text()


def exit_error_class(runner: Runner) -> type[ExperimentExitError]:
    """A container runner raises its engine's class (`DockerContainerError`, Podman's
    `PodmanContainerError` under it); the local runner raises the neutral one."""
    if isinstance(runner, DockerRunner):
        return DockerContainerError.for_engine(runner.engine.name)
    return ExperimentExitError


async def test_nonzero_exit(make: MakeRunner) -> None:
    runner = make("echo oops >&2; exit 7")
    with pytest.raises(ExperimentExitError) as info:
        await runner.run({"c": 1})
    assert type(info.value) is exit_error_class(runner)
    assert info.value.exit_code == 7
    assert info.value.stderr_snippet == "oops"


async def test_no_result(make: MakeRunner) -> None:
    runner = make("true")
    with pytest.raises(ExperimentExitError, match="wrote no result") as info:
        await runner.run({"d": 1})
    assert type(info.value) is exit_error_class(runner)


async def test_cancellation_leaves_nothing_running(make: MakeRunner) -> None:
    recorder = Recorder()
    runner = make("sleep 600")
    task = asyncio.create_task(runner.run({"h": 1}, observer=recorder))
    await asyncio.wait_for(recorder.started_event.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=30)
    info = recorder.started[0]
    if info.process_id is not None:
        with pytest.raises(ProcessLookupError):
            os.kill(info.process_id, 0)


async def test_python_helper_function(make: MakeRunner) -> None:
    result = await make(function="builtins:dict").run({"echo": "x"})
    assert isinstance(result, ExperimentResult)
    assert result.data == {"echo": "x"}
