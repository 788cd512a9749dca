"""Each study setting is validated once, at load, with its line: time limits, placement, GPUs.

No Docker, no Ray: the loader, the schema and `llem-dispatch run --dry-run`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from llem_dispatch.cli import app
from llem_dispatch.cluster import RaySettings
from llem_dispatch.errors import ConfigError
from llem_dispatch.gpu import SettleSpec
from llem_dispatch.study import Study, expand_study, load_study

BASE = "name: s\nfunction: m:f\ngrid: {x: [1, 2]}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


BAD_LIMITS = [".inf", "-.inf", ".nan", "nan", "0", "-1"]


@pytest.mark.parametrize("field", ["timeout_s", "silence_timeout_s"])
@pytest.mark.parametrize("value", BAD_LIMITS)
def test_a_time_limit_that_is_not_finite_and_positive_is_a_located_error(
    tmp_path: Path, field: str, value: str
) -> None:
    path = write(tmp_path, BASE + f"{field}: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    message = info.value.message
    assert f"{path}:4: {field}: must be a finite number of seconds > 0" in message
    assert "leave it out for no limit" in message  # the fix, in the line itself
    assert "1 problem(s)" in message


@pytest.mark.parametrize("value", [math.inf, math.nan, 0, -1])
def test_a_study_built_in_python_cannot_hold_a_bad_limit(value: float) -> None:
    with pytest.raises(ValidationError, match="must be a finite number of seconds > 0"):
        Study.model_validate({"grid": {"x": [1]}, "timeout_s": value})


def test_a_finite_positive_limit_and_null_load() -> None:
    study = Study.model_validate({"grid": {"x": [1]}, "timeout_s": 0.5, "silence_timeout_s": None})
    assert (study.timeout_s, study.silence_timeout_s) == (0.5, None)


@pytest.mark.parametrize("field", ["experiment_gap_s", "cycle_gap_s", "stop_grace_s"])
def test_other_durations_are_finite(tmp_path: Path, field: str) -> None:
    with pytest.raises(ConfigError, match=f"study.yaml:4: {field}: Input should be a finite"):
        load_study(write(tmp_path, BASE + f"{field}: .inf\n"))


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["run", *args])
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize("value", [".inf", ".nan", "0", "-1"])
def test_the_cli_exits_2_with_the_located_error(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, BASE + f"timeout_s: {value}\n")
    code, output = run_cli(str(path), "--dry-run", "--virtual-gpus", "1")
    assert code == 2, output
    assert "study.yaml:4: timeout_s: must be a finite number of seconds > 0" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_the_timeout_option_is_checked_by_the_same_rule(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, BASE + "timeout_s: 60\n")
    code, output = run_cli(str(path), "--dry-run", "--virtual-gpus", "1", "--timeout", value)
    assert code == 2, output
    assert "(overridden on the command line): timeout_s: must be a finite number" in output


def test_a_good_study_dry_runs(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "timeout_s: 60\nrunner: local\n")
    code, output = run_cli(str(path), "--dry-run", "--virtual-gpus", "1")
    assert code == 0, output
    assert "2 experiments (dry run)" in output


# -- placement -----------------------------------------------------------------------


def test_the_default_placement_is_local_with_no_settings_block() -> None:
    study = Study.model_validate({"grid": {"x": [1]}})
    assert (study.placement, study.placement_settings()) == ("local", None)


def test_an_unknown_placement_is_a_located_error_naming_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "placement: rayy\n")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    message = info.value.message
    assert f"{path}:4: placement: unknown placement 'rayy'" in message
    assert "did you mean 'ray'?" in message
    assert "known placements: local, ray" in message


def test_cluster_address_is_the_ray_form(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, BASE + "cluster: 10.0.0.5:6379\n"))
    assert study.placement == "ray"
    ray = study.placement_settings()
    assert isinstance(ray, RaySettings)
    assert ray.address == "10.0.0.5:6379"


def test_cluster_keeps_the_other_ray_settings(tmp_path: Path) -> None:
    text = BASE + "cluster: auto\nray: {placement_timeout_s: 5, num_cpus: 2}\n"
    ray = load_study(write(tmp_path, text)).placement_settings()
    assert isinstance(ray, RaySettings)
    assert (ray.address, ray.placement_timeout_s, ray.num_cpus) == ("auto", 5, 2)


def test_the_ray_block_names_the_address(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, BASE + "placement: ray\nray: {address: 'h:6379'}\n"))
    ray = study.placement_settings()
    assert isinstance(ray, RaySettings)
    assert ray.address == "h:6379"
    assert study.cluster is None


@pytest.mark.parametrize(
    ("text", "line", "said"),
    [
        ("cluster: h:1\nplacement: local\n", 5, "`cluster: h:1` runs on a Ray cluster"),
        ("ray: {address: h:1}\n", 4, "a `ray:` block, but the study runs on `placement: local`"),
        ("cluster: h:1\nray: {address: h:2}\n", 5, "disagree: give the address once"),
        ("placement: ray\nray: {placement_timeout_s: .inf}\n", 5, "Input should be a finite"),
        (
            "placement: ray\nray: {adress: h:1}\n",
            5,
            "ray.adress: unknown field; did you mean 'address'?",
        ),
        (
            "placement: ray\nray: {num_cpus: many}\n",
            5,
            "ray.num_cpus: Input should be a valid number",
        ),
        ("placement: local\nlocal: {x: 1}\n", 5, "local: placement 'local' takes no settings"),
        ("rya: {address: h:1}\n", 4, "rya: unknown field; did you mean 'ray'?"),
    ],
)
def test_placement_settings_that_contradict_are_located(
    tmp_path: Path, text: str, line: int, said: str
) -> None:
    path = write(tmp_path, BASE + text)
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert f"{path}:{line}: " in info.value.message
    assert said in info.value.message


def test_a_null_block_of_another_placement_is_no_block(tmp_path: Path) -> None:
    # What the study.yaml of older results dirs says for a local study.
    study = load_study(write(tmp_path, BASE + "ray: null\nslurm: null\n"))
    assert (study.placement, study.placement_settings()) == ("local", None)
    assert "ray" not in study.model_dump(by_alias=True)


def test_on_placement_overrides_the_file_and_checks_again() -> None:
    study = Study.model_validate({"grid": {"x": [1]}, "ray": {"num_cpus": 2}, "placement": "ray"})
    moved = study.on_placement("ray", {"address": "h:7"}).placement_settings()
    assert isinstance(moved, RaySettings)
    assert (moved.address, moved.num_cpus) == ("h:7", 2)
    with pytest.raises(ConfigError, match="placement_timeout_s"):
        study.on_placement("ray", {"placement_timeout_s": -1})
    with pytest.raises(ConfigError, match="unknown placement 'slurmm'"):
        study.on_placement("slurmm")


# -- GPUs and the settle model --------------------------------------------------------


def test_the_gpu_id_list_keeps_its_file_key_and_reads_as_ids(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, BASE + "gpus: [0, 1]\n"))
    assert study.gpu_ids == ["0", "1"]
    assert study.model_dump(by_alias=True)["gpus"] == ["0", "1"]
    assert load_study(write(tmp_path, BASE + "gpus: auto\n")).gpu_ids == "auto"


def test_the_attribute_name_is_not_a_file_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gpu_ids: unknown field; did you mean 'gpus'"):
        load_study(write(tmp_path, BASE + "gpu_ids: [0]\n"))


def test_each_experiment_has_a_gpu_count(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, BASE + "gpus_per_experiment: 2\n"))
    assert {e.gpu_count for e in expand_study(study)} == {2}


@pytest.mark.parametrize(
    ("text", "line", "where"),
    [
        ("gpus_field: tp\nconfigs: [{tp: -1}]\n", 5, "configs[0].tp is -1"),
        ("gpus_field: tp\nbase: {tp: 1.5}\n", 5, "base.tp is 1.5"),
        ("gpus_field: tp\ngrid: {x: [1], tp: [1, true]}\n", 5, "grid.tp[1] is True"),
    ],
)
def test_a_per_config_gpu_count_is_checked_once_at_load(
    tmp_path: Path, text: str, line: int, where: str
) -> None:
    path = write(tmp_path, "name: s\nfunction: m:f\ngrid: {x: [1]}\n" + text)
    if "grid:" in text:
        path = write(tmp_path, "name: s\nfunction: m:f\n" + text)
        line -= 1
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert f"{path}:{line}: " in info.value.message
    assert where in info.value.message
    assert "the number of GPUs must be a whole number >= 0" in info.value.message


def test_the_study_settle_block_is_the_gpu_layer_settle_model(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, BASE + "settle: {min_s: 1, max_s: 9}\n"))
    assert type(study.settle) is SettleSpec
    assert (study.settle.min_s, study.settle.max_s, study.settle.hold_s) == (1, 9, 3.0)


@pytest.mark.parametrize(
    ("block", "said"),
    [
        ("{min_s: 10, max_s: 5}", "settle.max_s (5.0) must be >= min_s (10.0)"),
        ("{max_s: .inf}", "settle.max_s: Input should be a finite number"),
        ("{sample_s: 0}", "settle.sample_s: Input should be greater than 0"),
        ("{hold: 3}", "settle.hold: unknown field"),
    ],
)
def test_a_bad_settle_block_is_located(tmp_path: Path, block: str, said: str) -> None:
    path = write(tmp_path, BASE + f"settle: {block}\n")
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert f"{path}:4: " in info.value.message
    assert said in info.value.message


def test_the_ray_flag_still_chooses_the_ray_placement(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "runner: local\n")
    code, output = run_cli(str(path), "--dry-run", "--ray", "10.0.0.1:6379", "--virtual-gpus", "1")
    assert code == 2, output
    assert "on a Ray cluster Ray assigns them" in output
    code, output = run_cli(str(path), "--dry-run", "--ray", "10.0.0.1:6379")
    assert code == 0, output
