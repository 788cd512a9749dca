"""Study files, expansion, runner resolution, and run_study's results dir (FakeRunner)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog.testing

from llem_dispatch import ConfigError, GpuRequestError
from llem_dispatch.gpu import GpuPool
from llem_dispatch.study import (
    Study,
    completed_keys,
    expand_study,
    get_default_image,
    load_study,
    parse_runner_value,
    resolve_runner,
    run_study,
)
from llem_dispatch.testing import FakeRunner


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_grid_expands_to_cartesian_product_with_base(tmp_path: Path) -> None:
    study = load_study(
        write(
            tmp_path,
            """
name: s
image: img:1
base: {repeats: 2}
grid:
  size: [1, 2, 3]
  dtype: [a, b]
configs:
  - {size: 99}
""",
        )
    )
    experiments = expand_study(study)
    assert len(experiments) == 7
    assert experiments[0].config == {"repeats": 2, "size": 99}
    assert {(e.config["size"], e.config.get("dtype")) for e in experiments[1:]} == {
        (s, d) for s in (1, 2, 3) for d in ("a", "b")
    }
    assert all(e.config["repeats"] == 2 for e in experiments)


def test_cycle_orders() -> None:
    base = {"grid": {"x": [1, 2]}, "n_cycles": 2, "image": "i:1"}
    seq = expand_study(Study.model_validate({**base, "cycle_order": "sequential"}))
    assert [(e.config["x"], e.cycle) for e in seq] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    inter = expand_study(Study.model_validate({**base, "cycle_order": "interleaved"}))
    assert [(e.config["x"], e.cycle) for e in inter] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    big = {"grid": {"x": list(range(20))}, "n_cycles": 2, "cycle_order": "shuffled", "seed": 7}
    one = [e.key for e in expand_study(Study.model_validate(big))]
    two = [e.key for e in expand_study(Study.model_validate(big))]
    assert one == two, "a recorded seed reproduces the order"
    other = [e.key for e in expand_study(Study.model_validate({**big, "seed": 8}))]
    assert one != other
    assert len(set(one)) == 40


def test_duplicate_configs_are_dropped_not_raced() -> None:
    study = Study.model_validate({"configs": [{"a": 1}, {"a": 1}, {"a": 2}], "image": "i:1"})
    assert len(expand_study(study)) == 2


def test_study_errors_are_all_listed_with_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """name: bad
image: "Not A Valid Image!"
timeout_s: -5
gpus_per_experiment: two
grid:
  size: []
colour: blue
""",
    )
    with pytest.raises(ConfigError) as info:
        load_study(path)
    message = info.value.message
    assert "5 problem(s)" in message
    assert f"{path}:2: image:" in message
    assert f"{path}:3: timeout_s:" in message
    assert f"{path}:4: gpus_per_experiment:" in message
    assert f"{path}:6: grid.size:" in message or f"{path}:5: grid:" in message
    assert f"{path}:7: colour: unknown field" in message
    assert "nothing was run" in info.value.fix_suggestion


def test_empty_study_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no experiments"):
        load_study(write(tmp_path, "name: empty\nimage: i:1\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(write(tmp_path, "grid: [unclosed\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_study(tmp_path / "missing.yaml")


def test_parse_runner_value() -> None:
    assert parse_runner_value("local").kind == "local"
    spec = parse_runner_value("docker:ghcr.io/org/img:1.2")
    assert (spec.kind, spec.image) == ("docker", "ghcr.io/org/img:1.2")
    with pytest.raises(ConfigError, match="unknown runner kind 'apptainer'"):
        parse_runner_value("apptainer")
    with pytest.raises(ConfigError, match="not a valid image"):
        parse_runner_value("docker:BAD IMAGE")


def test_resolve_runner_precedence() -> None:
    study = Study.model_validate({"grid": {"x": [1]}, "image": "s:1", "runner": "local"})
    env = {"LLEM_RUNNER": "docker:e:1"}
    assert resolve_runner("docker:x:1", study, environ=env).source == "explicit"
    by_env = resolve_runner(None, study, environ=env)
    assert (by_env.kind, by_env.image, by_env.source) == ("docker", "e:1", "env")
    assert resolve_runner(None, study, environ={}).source == "study"
    auto = Study.model_validate({"grid": {"x": [1]}, "image": "s:1"})
    assert resolve_runner(None, auto, environ={}, probe=lambda: True).kind == "docker"
    fallback = resolve_runner(None, auto, environ={}, probe=lambda: False)
    assert (fallback.kind, fallback.source) == ("local", "auto")


def test_get_default_image() -> None:
    images = {"pytorch": "pt:1", "vllm": "vllm:1"}
    assert get_default_image("vllm", images, environ={}) == "vllm:1"
    assert get_default_image("vllm", images, environ={"LLEM_IMAGE_VLLM": "mine:2"}) == "mine:2"
    with pytest.raises(ConfigError, match="LLEM_IMAGE_TENSORRT"):
        get_default_image("tensorrt", images, environ={})


async def test_run_study_writes_records_journal_summary(tmp_path: Path) -> None:
    study = Study.model_validate(
        {"name": "t", "grid": {"x": [1, 2, 3]}, "n_cycles": 2, "gpus_per_experiment": 1}
    )
    summary = await run_study(
        study, tmp_path / "out", runner=FakeRunner(), pool=GpuPool.virtual_devices(2)
    )
    assert (summary.total, summary.succeeded, summary.exit_code) == (6, 6, 0)
    out = tmp_path / "out"
    assert len(list((out / "records").glob("*.json"))) == 6
    assert json.loads((out / "summary.json").read_text())["succeeded"] == 6
    events = [
        json.loads(line)["event"] for line in (out / "journal.jsonl").read_text().splitlines()
    ]
    assert events[0] == "study_started"
    assert events[-1] == "study_finished"
    assert events.count("succeeded") == 6
    assert (out / "study.yaml").exists()


async def test_gpu_request_over_pool_fails_before_running(tmp_path: Path) -> None:
    runner = FakeRunner()
    study = Study.model_validate({"grid": {"x": [1]}, "gpus_per_experiment": 5})
    with pytest.raises(GpuRequestError):
        await run_study(study, tmp_path / "o", runner=runner, pool=GpuPool.virtual_devices(4))
    assert runner.calls == []


async def test_results_dir_with_records_needs_resume(tmp_path: Path) -> None:
    study = Study.model_validate({"grid": {"x": [1]}})
    await run_study(study, tmp_path / "o", runner=FakeRunner())
    with pytest.raises(ConfigError, match="--resume"):
        await run_study(study, tmp_path / "o", runner=FakeRunner())


async def test_resume_after_interrupt_runs_each_experiment_exactly_once(tmp_path: Path) -> None:
    study = Study.model_validate({"grid": {"x": list(range(10))}, "max_concurrency": 2})
    finished: list[int] = []
    gate = anyio.Event()

    async def slow_after_four(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        if len(finished) >= 4:
            gate.set()
            await anyio.sleep(60)
        finished.append(config["x"])
        return {"x": config["x"]}

    out = tmp_path / "o"
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_study(study, out, runner=FakeRunner(slow_after_four)))
            await gate.wait()
            tg.cancel_scope.cancel()
    first_done = completed_keys(out)
    assert len(first_done) == 4
    journal = (out / "journal.jsonl").read_text()
    assert '"event": "interrupted"' in journal

    rerun: list[int] = []

    def record(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        rerun.append(config["x"])
        return {"x": config["x"]}

    summary = await run_study(study, out, runner=FakeRunner(record), resume=True)
    assert summary.skipped == 4
    assert sorted(finished + rerun) == list(range(10)), "each experiment ran to success once"
    assert len(list((out / "records").glob("*.json"))) == 10
    assert len(completed_keys(out)) == 10


async def test_shuffled_without_seed_records_the_seed_used(tmp_path: Path) -> None:
    study = Study.model_validate({"grid": {"x": list(range(5))}, "cycle_order": "shuffled"})
    await run_study(study, tmp_path / "o", runner=FakeRunner())
    saved = load_study(tmp_path / "o" / "study.yaml")
    assert saved.seed is not None
    order = [e.key for e in expand_study(saved)]
    started = [
        json.loads(line) for line in (tmp_path / "o" / "journal.jsonl").read_text().splitlines()
    ]
    assert [e["key"] for e in started if e["event"] == "started"] == order


def test_gpus_field_gives_each_experiment_its_own_count(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "gpus_field: tp\ngpus_per_experiment: 1\n"
        "configs:\n  - {model: 8b, tp: 1}\n  - {model: 70b, tp: 4}\n  - {model: 3b}\n"
    )
    experiments = expand_study(load_study(path))
    assert {e.config["model"]: e.gpu_count for e in experiments} == {"8b": 1, "70b": 4, "3b": 1}


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ("grid: {tp: [1, two]}", r":2: grid: grid\.tp\[1\] is 'two'"),
        ("grid: {m: [a]}\nconfigs:\n  - {tp: -1}", r":3: configs: configs\[0\]\.tp is -1"),
        ("base: {tp: 1.5}", r":2: base: base\.tp is 1\.5"),
        ("base: {tp: true}", r"base\.tp is True"),
    ],
)
def test_bad_gpus_field_values_are_study_errors_with_their_line(
    tmp_path: Path, body: str, where: str
) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("gpus_field: tp\n" + body + "\n")
    with pytest.raises(ConfigError, match=where):
        load_study(path)


async def test_mixed_gpu_counts_run_with_their_own_counts(tmp_path: Path) -> None:
    study = Study.model_validate(
        {"gpus_field": "tp", "configs": [{"m": "a", "tp": 1}, {"m": "b", "tp": 2}]}
    )
    runner = FakeRunner()
    summary = await run_study(study, tmp_path / "o", runner=runner, pool=GpuPool.virtual_devices(2))
    assert summary.succeeded == 2
    assert {r.config["m"]: len(r.gpu_ids) for r in summary.records} == {"a": 1, "b": 2}


def test_gpus_field_over_the_pool_fails_before_running(tmp_path: Path) -> None:
    study = Study.model_validate({"gpus_field": "tp", "configs": [{"tp": 1}, {"tp": 8}]})
    runner = FakeRunner()
    with pytest.raises(GpuRequestError):
        anyio.run(
            lambda: run_study(study, tmp_path / "o", runner=runner, pool=GpuPool.virtual_devices(4))
        )
    assert runner.calls == []


async def test_a_daemon_hung_past_the_retries_stops_the_study(tmp_path: Path) -> None:
    from llem_dispatch.dispatch import RetryPolicy
    from llem_dispatch.errors import DockerDaemonHungError

    calls: list[int] = []

    async def hung(config: dict[str, Any], gpus: tuple[str, ...]) -> dict[str, Any]:
        calls.append(config["x"])
        if config["x"] == 0:
            raise DockerDaemonHungError("the Docker daemon did not answer `start` within 60s")
        await anyio.sleep(60)  # the others would hang as long
        return {}

    study = Study.model_validate({"grid": {"x": list(range(10))}, "max_concurrency": 2})
    out = tmp_path / "o"
    with anyio.fail_after(20):
        summary = await run_study(
            study,
            out,
            runner=FakeRunner(hung),
            pool=GpuPool.virtual_devices(2),
            retry_policy=RetryPolicy(max_attempts=3, base_delay_s=0.01),
        )
    assert summary.stopped is not None
    assert "did not answer `start`" in summary.stopped
    assert summary.exit_code == 1
    assert calls.count(0) == 3, "retried as transient before giving up"
    assert len(set(calls)) <= 3, "nothing new was dispatched after the verdict"
    records = list((out / "records").glob("*.json"))
    assert len(records) == 1, "only the hung experiment has a record; the rest wait for --resume"
    events = [
        json.loads(line)["event"] for line in (out / "journal.jsonl").read_text().splitlines()
    ]
    assert "stopped" in events
    assert events[-1] == "study_finished"


def test_prestart_memory_reserve_is_a_size_checked_where_it_is_written(tmp_path: Path) -> None:
    text = "name: s\nfunction: m:f\nvirtual_gpus: 1\nprestart: true\n"
    study = load_study(write(tmp_path, text + 'prestart_memory_reserve: "32g"\ngrid: {a: [1]}\n'))
    assert study.prestart_memory_reserve == "32g"
    with pytest.raises(ConfigError, match=r"study\.yaml:5: prestart_memory_reserve: cannot parse"):
        load_study(write(tmp_path, text + "prestart_memory_reserve: lots\ngrid: {a: [1]}\n"))


def test_a_study_naming_gpus_without_a_count_is_told_what_zero_means(tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("name: s\nfunction: m:f\nvirtual_gpus: 2\ngrid: {i: [1]}\n")
    with structlog.testing.capture_logs() as logs:
        load_study(path)
    (warning,) = [e for e in logs if e["event"] == "study_gives_experiments_no_gpus"]
    assert warning["where"] == f"{path}:3"
    assert "0 GPUs" in warning["message"]
    assert "gpus_per_experiment: 1" in warning["fix"]
    path.write_text(
        "name: s\nfunction: m:f\nvirtual_gpus: 2\ngpus_per_experiment: 0\ngrid: {i: [1]}\n"
    )
    with structlog.testing.capture_logs() as logs:
        load_study(path)
    assert not [e for e in logs if e["event"] == "study_gives_experiments_no_gpus"]
