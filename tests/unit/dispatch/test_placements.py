"""Placements: the public seam, the registry by name, and run_study through either one.

No Docker, no Ray: the Ray placement is only built (it connects on first use),
and a placement of the test's own shows how the next one (Slurm) plugs in.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

import llem_dispatch
from llem_dispatch import (
    LocalPlacement,
    Placement,
    PlacementRequest,
    RayPlacement,
    RaySettings,
    register_placement,
)
from llem_dispatch.dispatch import Dispatcher, HostGpus, registry
from llem_dispatch.dispatch.registry import known_placements, placement_class, placement_names
from llem_dispatch.errors import ConfigError, GpuRequestError
from llem_dispatch.gpu import SettleSpec
from llem_dispatch.study import Study, load_study, run_study
from llem_dispatch.testing import FakeRunner


@pytest.fixture
def restore_registry() -> Iterator[None]:
    """Leave the module-wide registry as it was (tests register placements of their own)."""
    known, classes = dict(registry._known), dict(registry._classes)
    yield
    registry._known.clear()
    registry._known.update(known)
    registry._classes.clear()
    registry._classes.update(classes)


def test_the_seam_is_public_and_documented() -> None:
    assert llem_dispatch.Placement is Placement
    assert issubclass(LocalPlacement, Placement)
    assert issubclass(RayPlacement, Placement)
    assert (LocalPlacement.on_this_host, RayPlacement.on_this_host) == (True, False)
    for hook in ("for_study", "prepare", "sweep", "describe", "attempt", "check_request"):
        assert (getattr(Placement, hook).__doc__ or "").strip(), hook


def test_built_in_placements_by_name() -> None:
    assert placement_names()[:2] == ["local", "ray"]
    assert placement_class("local") is LocalPlacement
    assert placement_class("ray") is RayPlacement
    assert known_placements["ray"].install_hint == (
        "pip install 'llem-dispatch[ray]' on the driver and on every node"
    )
    with pytest.raises(TypeError):
        known_placements["x"] = known_placements["ray"]  # type: ignore[index]


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown placement 'lcoal'; did you mean 'local'\?"):
        placement_class("lcoal")


@pytest.mark.usefixtures("restore_registry")
def test_a_placement_whose_needs_are_missing_says_what_to_install() -> None:
    register_placement(
        "slurmish",
        "llem_dispatch.dispatch.placement:LocalPlacement",
        install_hint="pip install 'llem-dispatch[slurm]'",
        requires=("llem_no_such_module",),
    )
    with pytest.raises(ConfigError, match="llem_no_such_module") as info:
        placement_class("slurmish")
    assert info.value.fix_suggestion == "pip install 'llem-dispatch[slurm]'"
    with pytest.raises(ValueError, match="already registered"):
        register_placement("slurmish", LocalPlacement)


def request(**fields: Any) -> PlacementRequest:
    defaults: dict[str, Any] = {
        "runner_factory": lambda host: FakeRunner(),
        "runner_kind": "docker",
        "max_gpu_count": 1,
        "results_dir": Path("/tmp/r"),
    }
    return PlacementRequest(**{**defaults, **fields})


def test_the_ray_placement_is_built_from_its_settings_without_connecting() -> None:
    settle = SettleSpec(min_s=1)
    built = RayPlacement.for_study(
        request(cooldown_s=2.0, settle=settle, stop_grace_s=4),
        RaySettings(address="h:6379", placement_timeout_s=7, num_cpus=2),
    )
    assert isinstance(built, RayPlacement)
    assert built.connection.address == "h:6379"
    assert (built.cooldown_s, built.settle, built.runner_type) == (2.0, settle, "docker")
    assert (built.num_cpus, built.watcher.timeout_s, built.cancel_timeout_s) == (2, 7, 34)
    assert not built.connection._owns_ray  # nothing was started or joined


def test_the_local_placement_builds_its_pool_and_runner_here() -> None:
    hosts: list[Any] = []
    runner = FakeRunner()

    def factory(host: Any) -> FakeRunner:
        hosts.append(host)
        return runner

    built = LocalPlacement.for_study(
        request(runner_factory=factory, host_gpus=HostGpus(virtual=3), prestart=True), None
    )
    assert isinstance(built, LocalPlacement)
    assert (built.runner, built.pool.size, built.pool.virtual) == (runner, 3, True)
    assert [(h.virtual, h.driver_host) for h in hosts] == [(True, True)]
    assert built.describe() == {"gpus": ["0", "1", "2"], "virtual_gpus": True}
    reserved = LocalPlacement.for_study(
        request(host_gpus=HostGpus(virtual=1), prestart_memory_reserve=123), None
    )
    assert reserved.memory_reserve.reserve_bytes == 123
    with pytest.raises(GpuRequestError):
        LocalPlacement.for_study(request(host_gpus=HostGpus(virtual=1), max_gpu_count=2), None)


class Elsewhere(LocalPlacement):
    """A placement of the test's own, chosen by name from a study as Slurm will be."""

    calls: ClassVar[list[str]] = []

    @classmethod
    def for_study(cls, request: PlacementRequest, settings: BaseModel | None) -> Elsewhere:
        cls.calls.append(f"for_study gpus={request.max_gpu_count} settings={settings}")
        return cls(request.runner_factory(_Host()), request.pool or HostGpus(virtual=2).pool())

    async def prepare(self, request: PlacementRequest) -> None:
        self.calls.append("prepare")
        await super().prepare(request)

    async def sweep(self, request: PlacementRequest, *, study_over: bool) -> None:
        self.calls.append(f"sweep study_over={study_over}")

    def describe(self) -> Mapping[str, Any]:
        return {"where": "elsewhere"}


class _Host:
    virtual = True
    driver_host = True


@pytest.mark.usefixtures("restore_registry")
async def test_a_registered_placement_runs_a_study_through_the_same_hooks(tmp_path: Path) -> None:
    register_placement("elsewhere", Elsewhere)
    Elsewhere.calls = []
    path = tmp_path / "study.yaml"
    path.write_text("name: e\nplacement: elsewhere\ngpus_per_experiment: 1\ngrid: {x: [1, 2]}\n")
    study = load_study(path)
    out = tmp_path / "out"
    summary = await run_study(study, out, runner_spec=None, runner=FakeRunner())
    assert (summary.succeeded, summary.total) == (2, 2)
    assert Elsewhere.calls == [
        "for_study gpus=1 settings=None",
        "prepare",
        "sweep study_over=False",
        "sweep study_over=True",
    ]
    facts = json.loads((out / "study.json").read_text())
    assert (facts["placement"], facts["where"]) == ("elsewhere", "elsewhere")
    started = json.loads((out / "journal.jsonl").read_text().splitlines()[0])
    assert (started["placement"], started["where"]) == ("elsewhere", "elsewhere")


async def test_run_study_on_the_local_placement_records_where_it_ran(tmp_path: Path) -> None:
    module = tmp_path / "exp_mod.py"
    module.write_text("def run(config):\n    return {'twice': 2 * config['x']}\n")
    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        "name: loc\nrunner: local\nfunction: exp_mod:run\nvirtual_gpus: 2\n"
        "gpus_per_experiment: 1\ntimeout_s: 60\ngrid: {x: [1, 2, 3]}\n"
    )
    out = tmp_path / "out"
    summary = await run_study(load_study(study_file), out, study_dir=tmp_path)
    assert (summary.succeeded, summary.runner) == (3, "local"), summary.records
    facts = json.loads((out / "study.json").read_text())
    assert (facts["placement"], facts["gpus"], facts["virtual_gpus"]) == ("local", ["0", "1"], True)
    results = sorted(r.result["data"]["twice"] for r in summary.records if r.result)
    assert results == [2, 4, 6]
    # The study as run loads again as a study: its keys are the file's (`gpus`, not gpu_ids).
    again = load_study(out / "study.yaml")
    assert (again.placement, again.timeout_s, again.virtual_gpus) == ("local", 60, 2)


async def test_a_remote_placement_refuses_a_runner_built_here(tmp_path: Path) -> None:
    study = Study.model_validate({"grid": {"x": [1]}})
    with pytest.raises(ConfigError, match="builds its runners on each host"):
        await run_study(study, tmp_path / "o", runner=FakeRunner(), cluster="127.0.0.1:1")
    with pytest.raises(ConfigError, match="placement 'local' takes no settings"):
        await run_study(study, tmp_path / "o", cluster_options={"placement_timeout_s": 3})
    on_ray = Study.model_validate({"grid": {"x": [1]}, "placement": "ray"})
    with pytest.raises(ConfigError, match="placement_timeout_s: Input should be greater than 0"):
        await run_study(on_ray, tmp_path / "o", cluster_options={"placement_timeout_s": 0})


@pytest.mark.parametrize("gpus", [-1, True, 1.5])
async def test_the_dispatcher_checks_a_gpu_count_once_for_every_placement(gpus: Any) -> None:
    async with Dispatcher(FakeRunner()) as dispatcher:
        with pytest.raises(GpuRequestError, match="whole number >= 0"):
            await dispatcher.run({"a": 1}, gpus=gpus)


@pytest.mark.usefixtures("restore_registry")
def test_placements_of_other_packages_arrive_through_entry_points(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from importlib.metadata import EntryPoint

    point = EntryPoint(
        name="elsewhere",
        value="tests.unit.dispatch.test_placements:Elsewhere",
        group=registry.ENTRY_POINT_GROUP,
    )
    monkeypatch.setattr(registry, "entry_points", lambda group: [point] if group else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert "elsewhere" in placement_names()
    assert placement_class("elsewhere") is Elsewhere
    study = Study.model_validate({"grid": {"x": [1]}, "placement": "elsewhere"})
    assert study.placement == "elsewhere"


def test_stop_bound_covers_each_placement_s_own_clean_up() -> None:
    """The CLI's last-resort exit waits for the placement's whole clean-up: on Ray, a
    slow drain (up to the cancel timeout) and then the end-of-study sweep."""
    from llem_dispatch.cluster.settings import RaySettings
    from llem_dispatch.dispatch import Placement, placement_class
    from llem_dispatch.runners import CANCEL_SLACK_S

    local = placement_class("local").stop_bound_s(2.0, None)
    assert local == 2.0 + CANCEL_SLACK_S
    ray = placement_class("ray")
    assert ray.stop_bound_s(2.0, None) == 2.0 + 30 + Placement.STUDY_SWEEP_S
    settings = RaySettings(cancel_timeout_s=100)
    assert ray.stop_bound_s(2.0, settings) == 100 + Placement.STUDY_SWEEP_S
    assert ray.stop_bound_s(2.0, None) > local
