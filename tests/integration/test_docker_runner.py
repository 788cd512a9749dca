"""DockerRunner against the real Docker Engine: the container protocol end to end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import BaseModel, ConfigDict

from llem_dispatch import (
    DockerContainerError,
    DockerGPUAccessError,
    DockerImagePullError,
    DockerOOMError,
    DockerRunner,
    DockerTimeoutError,
    DockerUnavailableError,
    ExperimentFailure,
    ExperimentResult,
    RunInfo,
    compute_config_hash,
)
from llem_dispatch.errors import ConfigError
from llem_dispatch.runners.podman import PodmanRunner
from tests.conftest import (
    BUSYBOX_IMAGE,
    CDI_TEST_KIND,
    PYTHON_IMAGE,
    cdi_test_uuids,
    fail_on_leaks,
    use_podman,
)

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leaked_containers")]

# Writes a result echoing the protocol as the container saw it, atomically.
ECHO_PROTOCOL = r"""
set -e
cfg=$(cat "$LLEM_CONFIG_PATH")
printf '{"config": %s, "config_path": "%s", "result_path": "%s", "exchange": "%s",
 "nvidia": "%s", "cuda": "%s", "gpu_ids": "%s", "shm_kb": %s, "uid": %s}' \
  "$cfg" "$LLEM_CONFIG_PATH" "$LLEM_RESULT_PATH" "$LLEM_EXCHANGE_DIR" \
  "$NVIDIA_VISIBLE_DEVICES" "$CUDA_VISIBLE_DEVICES" "$LLEM_GPU_IDS" \
  "$(df -k /dev/shm | tail -1 | awk '{print $2}')" "$(id -u)" > "$LLEM_EXCHANGE_DIR/.tmp"
mv "$LLEM_EXCHANGE_DIR/.tmp" "$LLEM_RESULT_PATH"
echo "done on stdout"
echo "note on stderr" >&2
"""

MakeRunner = Callable[..., DockerRunner]


@pytest.fixture(params=["docker", "podman"])
async def make_runner(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    test_labels: dict[str, str],
    exchange_base: Path,
) -> AsyncIterator[MakeRunner]:
    """The runner under test: on Docker, and the same tests on Podman's compatible API
    (there DOCKER_HOST points the docker CLI of the helpers at Podman)."""
    runners: list[DockerRunner] = []
    podman = request.param == "podman"
    url = use_podman(request, monkeypatch) if podman else None

    def make(image: str = BUSYBOX_IMAGE, **kwargs: Any) -> DockerRunner:
        kwargs.setdefault("labels", test_labels)
        kwargs.setdefault("exchange_base", exchange_base)
        kwargs.setdefault("shm_size", "64m")
        runner = (
            PodmanRunner(image, docker_host=url, **kwargs)
            if podman
            else DockerRunner(image, **kwargs)
        )
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        await runner.aclose()
    if podman:
        fail_on_leaks(f"llem.test.node={test_labels['llem.test.node']}")


def docker_only(runner: DockerRunner, why: str) -> None:
    """Skip the Podman variant of a test about something only Docker does."""
    if runner.runner_type != "docker":
        pytest.skip(f"{runner.runner_type}: {why}")


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def kept_dirs(base: Path) -> list[Path]:
    return sorted(p for p in base.iterdir() if p.name.startswith("llem-"))


class Recorder:
    """A RunObserver that remembers what it saw."""

    def __init__(self) -> None:
        self.started: list[RunInfo] = []
        self.exited: list[RunInfo] = []
        self.started_event = asyncio.Event()

    def on_started(self, info: RunInfo) -> None:
        self.started.append(info)
        self.started_event.set()

    def on_exited(self, info: RunInfo) -> None:
        self.exited.append(info)


def container_exists(container_id: str) -> bool:
    proc = subprocess.run(["docker", "inspect", container_id], capture_output=True, check=False)
    return proc.returncode == 0


async def test_protocol_round_trip(make_runner: MakeRunner, exchange_base: Path) -> None:
    config = {"model": "tiny", "batch_size": 4, "nested": {"b": [1, 2], "a": None}}
    runner = make_runner(command=sh(ECHO_PROTOCOL), shm_size="128m")
    result = await runner.run(config)
    assert isinstance(result, ExperimentResult)
    config_hash = compute_config_hash(config)
    assert result.config_hash == config_hash
    assert result.data["config"] == config
    assert result.data["exchange"] == "/run/llem"
    assert result.data["config_path"] == f"/run/llem/{config_hash}_config.json"
    assert result.data["result_path"] == f"/run/llem/{config_hash}_result.json"
    assert result.data["shm_kb"] == 128 * 1024
    # Runner metadata, for reproducibility.
    assert result.runner.runner_type == runner.runner_type
    assert result.runner.runner_image == BUSYBOX_IMAGE
    assert result.runner.image_digest is not None
    # An image id, or a repo digest (Podman gives locally loaded images one).
    assert result.runner.image_digest.split("@")[-1].startswith("sha256:")
    assert result.runner.container_id is not None
    assert len(result.runner.container_id) == 64
    assert result.effective_config["runner_type"] == runner.runner_type
    assert result.effective_config["batch_size"] == 4
    # Success removes the exchange dir and the container.
    assert kept_dirs(exchange_base) == []
    assert not container_exists(result.runner.container_id)


class FrozenResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    throughput: float
    effective_config: dict[str, Any] = {}


async def test_result_model_validation_and_metadata_injection(make_runner: MakeRunner) -> None:
    script = (
        'printf \'{"throughput": 12.5, "effective_config": {"dtype": "bf16"}}\' '
        '> "$LLEM_RESULT_PATH"'
    )
    runner = make_runner(command=sh(script), result_model=FrozenResult, source="study")
    result = await runner.run({"x": 1}, gpus=None)
    assert isinstance(result, FrozenResult)
    assert result.throughput == 12.5
    assert result.effective_config["dtype"] == "bf16"
    assert result.effective_config["runner_type"] == runner.runner_type
    assert result.effective_config["runner_source"] == "study"
    assert result.effective_config["runner_image"] == BUSYBOX_IMAGE
    assert str(result.effective_config["image_digest"]).split("@")[-1].startswith("sha256:")


async def test_result_of_wrong_schema_keeps_exchange_dir(
    make_runner: MakeRunner, exchange_base: Path
) -> None:
    from llem_dispatch import ResultError

    runner = make_runner(
        command=sh('printf \'{"throughput": "fast"}\' > "$LLEM_RESULT_PATH"'),
        result_model=FrozenResult,
    )
    with pytest.raises(ResultError, match=r"throughput") as info:
        await runner.run({"x": 2})
    assert info.value.exchange_dir is not None
    assert Path(info.value.exchange_dir).is_dir()
    assert kept_dirs(exchange_base) == [Path(info.value.exchange_dir)]


async def test_error_payload_becomes_experiment_failure(
    make_runner: MakeRunner, exchange_base: Path
) -> None:
    script = (
        'echo "loading model" ; echo "CUDA error: boom" >&2; '
        'printf \'{"type": "RuntimeError", "message": "boom", "traceback": "tb"}\' '
        '> "$LLEM_EXCHANGE_DIR/${LLEM_CONFIG_HASH}_error.json"; exit 1'
    )
    runner = make_runner(command=sh(script))
    outcome = await runner.run({"x": 3})
    assert isinstance(outcome, ExperimentFailure)
    assert (outcome.type, outcome.message, outcome.traceback) == ("RuntimeError", "boom", "tb")
    assert outcome.exit_code == 1
    assert outcome.exchange_dir is not None
    kept = Path(outcome.exchange_dir)
    assert kept_dirs(exchange_base) == [kept]
    log_text = (kept / "container.log").read_text()
    assert "loading model" in log_text
    assert "CUDA error: boom" in log_text
    assert outcome.container_id is not None
    assert not container_exists(outcome.container_id)


async def test_error_payload_inside_result_file(make_runner: MakeRunner) -> None:
    script = 'printf \'{"type": "ValueError", "message": "bad"}\' > "$LLEM_RESULT_PATH"'
    outcome = await make_runner(command=sh(script)).run({"x": 4})
    assert isinstance(outcome, ExperimentFailure)
    assert outcome.type == "ValueError"


async def test_nonzero_exit_raises_container_error_with_stderr_tail(
    make_runner: MakeRunner, exchange_base: Path
) -> None:
    script = 'for i in $(seq 1 30); do echo "line $i" >&2; done; exit 3'
    with pytest.raises(DockerContainerError) as info:
        await make_runner(command=sh(script)).run({"x": 5})
    err = info.value
    assert err.exit_code == 3
    lines = err.stderr_snippet.splitlines()
    assert lines == [f"line {i}" for i in range(11, 31)]
    assert err.container_id is not None
    assert err.exchange_dir is not None
    assert Path(err.exchange_dir, "container.log").read_text().count("line ") == 30
    assert "Fix:" in str(err)
    assert not container_exists(err.container_id)


async def test_exit_zero_without_result_names_the_path(make_runner: MakeRunner) -> None:
    with pytest.raises(DockerContainerError, match=r"wrote no result at .*_result\.json"):
        await make_runner(command=sh("echo nothing")).run({"x": 6})


async def test_timeout_kills_and_removes_within_bound(make_runner: MakeRunner) -> None:
    recorder = Recorder()
    runner = make_runner(command=["sleep", "600"], timeout=2)
    start = time.monotonic()
    with pytest.raises(DockerTimeoutError) as info:
        await runner.run({"x": 7}, observer=recorder)
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"timeout took {elapsed:.1f}s"
    assert info.value.container_id is not None
    assert not container_exists(info.value.container_id)
    assert recorder.exited, "observer saw the exit"
    # The engine's own class and its name with the URL, in the error and the run info.
    engine = runner.engine
    assert type(info.value).__name__ == f"{engine.name}TimeoutError"
    assert recorder.exited[0].engine == f"{engine.name} at {engine.url}"


async def test_timeout_exit_137_is_not_oom(make_runner: MakeRunner) -> None:
    # A container that ignores SIGTERM: our SIGKILL gives exit 137, still a timeout.
    runner = make_runner(command=sh("trap '' TERM; sleep 600"), timeout=1)
    with pytest.raises(DockerTimeoutError) as info:
        await runner.run({"x": 8})
    assert not isinstance(info.value, DockerOOMError)
    assert info.value.exit_code == 137


async def test_cancellation_kills_and_removes_container(
    make_runner: MakeRunner, exchange_base: Path
) -> None:
    recorder = Recorder()
    runner = make_runner(command=["sleep", "600"])
    task = asyncio.create_task(runner.run({"x": 9}, observer=recorder))
    await asyncio.wait_for(recorder.started_event.wait(), timeout=30)
    container_id = recorder.started[0].container_id
    assert container_id is not None
    assert container_exists(container_id)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=30)
    assert not container_exists(container_id)


async def test_missing_image_is_image_pull_error(make_runner: MakeRunner) -> None:
    runner = make_runner("llem-test/does-not-exist:1.0", command=["true"])
    with pytest.raises(DockerImagePullError) as info:
        await runner.run({"x": 10})
    # Named on the engine that lacks it, with that engine's own commands.
    assert f"not present on {runner.engine}" in info.value.message
    cli = runner.engine.name.lower()
    assert f"{cli} build -t llem-test/does-not-exist:1.0" in info.value.fix_suggestion


async def test_gpu_request_without_nvidia_runtime_is_gpu_access_error(
    make_runner: MakeRunner,
) -> None:
    runner = make_runner(command=sh(ECHO_PROTOCOL))
    docker_only(runner, "GPUs go by CDI name only (test_gpus_by_cdi_name)")
    with pytest.raises(DockerGPUAccessError) as info:
        await runner.run({"x": 11}, gpus=["0", "1"])
    assert "NVIDIA Container Toolkit" in info.value.fix_suggestion
    assert info.value.container_id is not None
    assert not container_exists(info.value.container_id)


async def test_gpu_passthrough_off_sets_visibility_only(make_runner: MakeRunner) -> None:
    runner = make_runner(command=sh(ECHO_PROTOCOL), gpu_passthrough=False)
    result = await runner.run({"x": 12}, gpus=["2", "3"])
    assert isinstance(result, ExperimentResult)
    assert result.data["nvidia"] == "2,3"
    assert result.data["cuda"] == "0,1"
    assert result.data["gpu_ids"] == "2,3"
    assert result.runner.gpu_ids == ["2", "3"]


async def test_device_request_is_exact(make_runner: MakeRunner) -> None:
    from llem_dispatch._exchange import ExchangeDir

    runner = make_runner(command=["true"])
    docker_only(runner, "NVIDIA device requests are never made (CDI only)")
    exchange = ExchangeDir(Path("/tmp/llem-x"), "h")
    spec = runner.container_spec(exchange, ["GPU-aaaa", "3"], config_hash="h")
    assert spec["HostConfig"]["DeviceRequests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["GPU-aaaa", "3"], "Capabilities": [["gpu"]]}
    ]
    assert "NVIDIA_VISIBLE_DEVICES=GPU-aaaa,3" in spec["Env"]
    no_gpu = runner.container_spec(exchange, [], config_hash="h")
    assert "DeviceRequests" not in no_gpu["HostConfig"]
    assert "NVIDIA_VISIBLE_DEVICES=void" in no_gpu["Env"]


@pytest.mark.cdi
async def test_gpus_by_cdi_name(make_runner: MakeRunner) -> None:
    """Each engine gives the container exactly the CDI devices named by UUID (fake spec)."""
    uuids = cdi_test_uuids()
    runner = make_runner(
        command=sh(
            "env | grep '^LLEM_CDI_GPU_' | sed 's/^[^=]*=//' | sort | tr '\\n' ' ' > /tmp/s; "
            'printf \'{"seen": "%s", "nvidia": "%s"}\' "$(cat /tmp/s)" '
            '"$NVIDIA_VISIBLE_DEVICES" > "$LLEM_RESULT_PATH"'
        ),
        gpu_devices="cdi",
        cdi_kind=CDI_TEST_KIND,
    )
    await runner.check_gpus(uuids)
    recorder = Recorder()
    result = await runner.run({"x": 30}, gpus=[uuids[3], uuids[1]], observer=recorder)
    assert isinstance(result, ExperimentResult)
    assert sorted(result.data["seen"].split()) == sorted([uuids[3], uuids[1]])
    assert result.data["nvidia"] == "void"
    assert recorder.started[0].gpu_request == "cdi"
    with pytest.raises(ConfigError, match="not known by UUID"):
        await runner.check_gpus(["0"])


async def test_oom_killed_is_oom_error(make_runner: MakeRunner) -> None:
    runner = make_runner(
        command=sh("dd if=/dev/zero of=/dev/null bs=100M count=1"), mem_limit="32m"
    )
    # Podman under Docker on this cgroup v1 host never sets State.OOMKilled (the kernel
    # kill is real): the exit-137 rule names the OOM killer there.
    evidence = "OOMKilled" if runner.runner_type == "docker" else "exit 137, not by us"
    with pytest.raises(DockerOOMError, match=evidence):
        await runner.run({"x": 13})


async def test_exit_137_from_outside_kill_is_oom_error(make_runner: MakeRunner) -> None:
    recorder = Recorder()
    runner = make_runner(command=["sleep", "600"])
    task = asyncio.create_task(runner.run({"x": 14}, observer=recorder))
    await asyncio.wait_for(recorder.started_event.wait(), timeout=30)
    container_id = recorder.started[0].container_id
    assert container_id is not None
    subprocess.run(["docker", "kill", container_id], check=True, capture_output=True)
    with pytest.raises(DockerOOMError, match="exit 137"):
        await asyncio.wait_for(task, timeout=30)


async def test_unreachable_daemon_is_unavailable_error(tmp_path: Path) -> None:
    runner = DockerRunner(BUSYBOX_IMAGE, docker_host=f"unix://{tmp_path}/no.sock")
    async with runner:
        with pytest.raises(DockerUnavailableError) as info:
            await runner.run({"x": 15})
    assert info.value.transient
    assert "Start the Docker daemon" in info.value.fix_suggestion


async def test_secret_reaches_experiment_but_not_inspect_or_logs(
    make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "hf_SECRETtoken1234567890"
    monkeypatch.setenv("HF_TOKEN", token)
    inspected: list[dict[str, Any]] = []

    class InspectingObserver(Recorder):
        def on_started(self, info: RunInfo) -> None:
            super().on_started(info)
            assert info.container_id is not None
            proc = subprocess.run(
                ["docker", "inspect", info.container_id], capture_output=True, text=True, check=True
            )
            inspected.append(json.loads(proc.stdout)[0])

    script = (
        'tok=$(sed -n \'s/.*"HF_TOKEN": *"\\([^"]*\\)".*/\\1/p\' "$LLEM_SECRETS_PATH"); '
        'echo "token is $tok"; echo "token is $tok" >&2; '
        'printf \'{"token_len": %s, "has_env": "%s"}\' "${#tok}" "${HF_TOKEN:-no}" '
        '> "$LLEM_RESULT_PATH"; exit 0'
    )
    with structlog.testing.capture_logs() as logs:
        result = await make_runner(command=sh(script)).run({"x": 16}, observer=InspectingObserver())
    assert isinstance(result, ExperimentResult)
    assert result.data == {"token_len": len(token), "has_env": "no"}
    assert inspected, "inspected while running"
    assert token not in json.dumps(inspected)
    assert token not in json.dumps(logs, default=str)


async def test_secret_redacted_from_kept_log_file(
    make_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "hf_OTHERsecret0987654321"
    monkeypatch.setenv("HF_TOKEN", token)
    script = 'cat "$LLEM_SECRETS_PATH"; cat "$LLEM_SECRETS_PATH" >&2; exit 2'
    with pytest.raises(DockerContainerError) as info:
        await make_runner(command=sh(script)).run({"x": 17})
    assert info.value.exchange_dir is not None
    kept = Path(info.value.exchange_dir)
    assert not (kept / ".llem-secrets.json").exists(), "secrets file removed after the run"
    log_text = (kept / "container.log").read_text()
    assert "HF_TOKEN" in log_text
    assert token not in log_text
    assert token not in str(info.value)


async def test_large_output_keeps_memory_bounded(make_runner: MakeRunner) -> None:
    def rss_kb() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    size = 64 * 1024 * 1024
    script = (
        f'yes "llem log flood line" | head -c {size}; echo "tail" >&2; '
        'echo "{}" > "$LLEM_RESULT_PATH"'
    )
    runner = make_runner(command=sh(script), timeout=120)
    await runner.image_digest()
    before = rss_kb()
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_kb())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        result = await runner.run({"x": 18})
    finally:
        sampler.cancel()
    assert isinstance(result, ExperimentResult)
    growth_mb = (peak - before) / 1024
    assert growth_mb < 16, f"RSS grew {growth_mb:.1f} MB for {size >> 20} MB of output"


async def test_one_runner_many_concurrent_runs(make_runner: MakeRunner) -> None:
    runner = make_runner(command=sh('sleep 1; echo "{\\"ok\\": true}" > "$LLEM_RESULT_PATH"'))
    await runner.image_digest()
    t0 = time.monotonic()
    await runner.run({"single": True})
    single = time.monotonic() - t0
    t0 = time.monotonic()
    results = await asyncio.gather(*(runner.run({"i": i}) for i in range(8)))
    many = time.monotonic() - t0
    assert all(isinstance(r, ExperimentResult) and r.data == {"ok": True} for r in results)
    ids = {r.runner.container_id for r in results if isinstance(r, ExperimentResult)}
    assert len(ids) == 8
    assert many < 5 * single, f"8 concurrent took {many:.2f}s vs {single:.2f}s for one"


async def test_helper_injected_into_plain_python_image(make_runner: MakeRunner) -> None:
    runner = make_runner(PYTHON_IMAGE, function="builtins:dict")
    result = await runner.run({"echo": [1, 2, 3]})
    assert isinstance(result, ExperimentResult)
    assert result.data == {"echo": [1, 2, 3]}


async def test_helper_reports_exception_as_failure(make_runner: MakeRunner) -> None:
    runner = make_runner(PYTHON_IMAGE, function="builtins:int")
    outcome = await runner.run({"echo": 1})
    assert isinstance(outcome, ExperimentFailure)
    assert outcome.type == "TypeError"
    assert outcome.traceback is not None
    assert "Traceback" in outcome.traceback
    assert outcome.exit_code == 1


async def test_security_defaults_in_effect(make_runner: MakeRunner) -> None:
    script = (
        "caps=$(grep CapEff /proc/self/status | awk '{print $2}'); "
        "nnp=$(grep NoNewPrivs /proc/self/status | awk '{print $2}'); "
        "sock=no; [ -e /var/run/docker.sock ] && sock=yes; "
        'printf \'{"caps": "%s", "nnp": "%s", "sock": "%s", "uid": %s}\' '
        '"$caps" "$nnp" "$sock" "$(id -u)" > "$LLEM_RESULT_PATH"'
    )
    result = await make_runner(command=sh(script)).run({"x": 19})
    assert isinstance(result, ExperimentResult)
    assert result.data["caps"] == "0000000000000000"
    assert result.data["nnp"] == "1"
    assert result.data["sock"] == "no"


@pytest.mark.skipif(os.geteuid() != 0, reason="handing the exchange dir to another uid needs root")
async def test_runs_as_given_non_root_user(make_runner: MakeRunner) -> None:
    result = await make_runner(command=sh(ECHO_PROTOCOL), user="65534:65534").run({"x": 20})
    assert isinstance(result, ExperimentResult)
    assert result.data["uid"] == 65534


async def test_dir_left_unreadable_by_non_root_user_keeps_result(
    make_runner: MakeRunner, exchange_base: Path
) -> None:
    # As root the exchange dir is handed to 65534; a non-root dispatcher cannot
    # do that, and its containers run as the caller by default instead.
    user = "65534:65534" if os.geteuid() == 0 else None
    script = (
        'echo "{\\"uid\\": $(id -u)}" > "$LLEM_RESULT_PATH" && '
        "mkdir /run/llem/x && chmod 000 /run/llem/x"
    )
    runner = make_runner(command=sh(script), user=user)
    with structlog.testing.capture_logs() as logs:
        result = await runner.run({"x": 21})
    assert isinstance(result, ExperimentResult)
    assert result.data["uid"] == (65534 if user else os.geteuid())
    assert kept_dirs(exchange_base) == []
    assert [e for e in logs if e["log_level"] == "warning"] == []
