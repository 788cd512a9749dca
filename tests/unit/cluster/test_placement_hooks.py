"""The Ray placement's study hooks (preflight, sweep, describe) over a stand-in node view.

No Ray: the connection's node view and the per-host tasks are replaced, so what
is checked is the placement's own logic; tests/cluster runs it on a real cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from llem_dispatch.cluster import NodeCheck, NodeSweep, RayPlacement, RaySettings
from llem_dispatch.dispatch import HostGpus, HostNeeds, NodeInfo, PlacementRequest
from llem_dispatch.errors import ClusterError, GpuRequestError
from llem_dispatch.testing import FakeRunner

NODE = NodeInfo(hostname="gpu1", node_id="ab" * 20, ip="10.0.0.7")


def request(**fields: Any) -> PlacementRequest:
    defaults: dict[str, Any] = {
        "runner_factory": lambda host: FakeRunner(),
        "runner_kind": "docker",
        "max_gpu_count": 2,
        "results_dir": Path("/tmp/results"),
    }
    return PlacementRequest(**{**defaults, **fields})


def placement(monkeypatch: pytest.MonkeyPatch, gpus: dict[str, int]) -> RayPlacement:
    built = RayPlacement.for_study(request(), RaySettings(address="10.0.0.1:6379"))
    assert isinstance(built, RayPlacement)
    monkeypatch.setattr(built.connection, "cluster_gpus", lambda max_age_s=2.0: gpus)
    return built


async def test_prepare_checks_every_host_and_says_what_it_ignores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ray = placement(monkeypatch, {"gpu1[ababab]": 2})
    asked: dict[str, Any] = {}

    async def preflight(**options: Any) -> list[NodeCheck]:
        asked.update(options)
        return [
            NodeCheck(NODE, engines={"docker": True}, missing_images=["img:1"], missing_paths=[])
        ]

    monkeypatch.setattr(ray, "preflight", preflight)
    wanted = request(
        host_gpus=HostGpus(virtual=2), prestart=True, host_needs=HostNeeds(("img:1",), ())
    )
    with capture_logs() as logs, pytest.raises(ClusterError, match="image img:1 is not there"):
        await ray.prepare(wanted)
    assert asked == {"runner": "docker", "images": ("img:1",), "paths": (), "gpus": 2}
    said = {entry["event"] for entry in logs}
    assert {"study_gpus_ignored_on_cluster", "study_prestart_ignored_on_cluster"} <= said


async def test_prepare_refuses_an_experiment_larger_than_every_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ray = placement(monkeypatch, {"gpu1[ababab]": 1, "gpu2[cdcdcd]": 1})
    with pytest.raises(GpuRequestError, match="never spans nodes"):
        await ray.prepare(request(max_gpu_count=2))


async def test_sweep_reaps_every_host_and_logs_each_orphan(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = placement(monkeypatch, {})
    asked: list[dict[str, Any]] = []
    orphan = {"container_id": "c0ffee" * 4, "config_hash": "0" * 16, "log_path": "/tmp/x.log"}

    async def sweep_hosts(**options: Any) -> list[NodeSweep]:
        asked.append(options)
        return [NodeSweep(NODE, reaped=[orphan], skipped=None)]

    monkeypatch.setattr(ray, "sweep_hosts", sweep_hosts)
    with capture_logs() as logs:
        await ray.sweep(request(), study_over=True)
    assert asked == [
        {
            "results_dir": Path("/tmp/results"),
            "logs_dir": Path("/tmp/results/orphans"),
            "study_over": True,
            "timeout_s": 60,
        }
    ]
    reaped = [entry for entry in logs if entry["event"] == "cluster_orphan_reaped"]
    assert [(r["node"], r["container_id"]) for r in reaped] == [(NODE.label, "c0ffeec0ffee")]


def test_describe_names_the_cluster_and_its_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = placement(monkeypatch, {"gpu1[ababab]": 2})
    assert ray.describe() == {"cluster": "10.0.0.1:6379", "cluster_gpus": {"gpu1[ababab]": 2}}
