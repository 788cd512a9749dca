"""A worker node leaves the Ray cluster mid-study (its raylet is killed)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from llem_dispatch import RayPlacement, Study, run_study
from tests.cluster.conftest import (
    RESULT,
    journal,
    records,
    start_cluster,
    stop_cluster,
    study_dict,
)
from tests.conftest import labelled_containers

pytestmark = [
    pytest.mark.ray,
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.usefixtures("no_leaked_containers"),
]

#: A resumed study: its start-of-study sweep (the placement's own bound), then the runs.
RESUME_BOUND_S = RayPlacement.STUDY_SWEEP_S + 90


@pytest.fixture
def fresh_cluster() -> Iterator[tuple[Any, list[Any]]]:
    cluster, nodes = start_cluster()
    yield cluster, nodes
    stop_cluster(cluster)


def started_nodes(out: Path) -> list[str]:
    path = out / "journal.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e["node"] for e in lines if e["event"] == "started"]


async def test_node_lost_mid_study_every_result_exactly_once_and_no_container_left(
    fresh_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    import ray

    cluster, nodes = fresh_cluster
    victim = nodes[1]
    victim_id = victim.node_id
    label = f"llem.test.node={test_labels['llem.test.node']}"
    study = Study.model_validate(study_dict(test_labels, "sleep 3; " + RESULT, n=16, retries=3))
    out = tmp_path / "out"
    summaries = []

    async def run() -> None:
        summaries.append(await run_study(study, out, cluster=cluster.address))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(90):
            # Wait until experiments are running on the victim node, then kill it.
            while sum(n.endswith(f"[{victim_id[:6]}]") for n in started_nodes(out)) < 2:
                await anyio.sleep(0.1)
        cluster.remove_node(victim, allow_graceful=False)
        lost_at = anyio.current_time()
        with anyio.fail_after(180):
            while not summaries:
                await anyio.sleep(0.2)
    summary = summaries[0]
    finished_after = anyio.current_time() - lost_at

    assert (summary.succeeded, summary.failed, summary.errored) == (16, 0, 0), summary
    recs = records(out)
    assert sorted(recs) == sorted(f"{r['config_hash']}_c1" for r in recs.values())
    assert len(recs) == 16
    events = journal(out)
    succeeded = Counter(e["key"] for e in events if e["event"] == "succeeded")
    assert len(succeeded) == 16
    assert set(succeeded.values()) == {1}, "a result recorded twice"
    retried = [e for e in events if e["event"] == "retried"]
    assert retried
    assert {e["error"] for e in retried} == {"ClusterNodeLostError"}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert victim_id not in alive
    for event in retried:
        # Every experiment lost with the node ran again, on a node that is still up.
        record = recs[event["key"]]
        assert record["attempts"] >= 2
        assert record["node"]["node_id"] in alive
    # The lost node's workers ran on; whatever container they left was swept.
    assert labelled_containers(label) == []
    print(
        f"node lost; {len(retried)} experiment(s) retried elsewhere; "
        f"study finished {finished_after:.1f}s later"
    )


# The limit follows the parts' bounds: both nodes started (90 s), the study giving up
# (120 s, its retries and placement timeout within it), a node added back, the resume.
@pytest.mark.timeout(90 + 120 + 60 + RESUME_BOUND_S + 30)
async def test_when_no_node_can_hold_an_experiment_it_fails_and_resume_runs_it_later(
    fresh_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    """Both GPU nodes leave: the study ends (not hangs), and --resume finishes it later."""
    cluster, nodes = fresh_cluster
    label = f"llem.test.node={test_labels['llem.test.node']}"
    data = study_dict(
        test_labels, 'sleep "$SLEEP"; ' + RESULT, n=4, gpus=2, retries=2, env={"SLEEP": "30"}
    )
    out = tmp_path / "out"
    summaries = []

    async def run() -> None:
        summaries.append(
            await run_study(
                Study.model_validate(data),
                out,
                cluster=cluster.address,
                cluster_options={"placement_timeout_s": 3},
            )
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(90):
            while len(started_nodes(out)) < 2:
                await anyio.sleep(0.1)
        for node in nodes:
            cluster.remove_node(node, allow_graceful=False)
        lost_at = anyio.current_time()
        with anyio.fail_after(120):
            while not summaries:
                await anyio.sleep(0.2)
    ended_after = anyio.current_time() - lost_at
    summary = summaries[0]
    assert (summary.succeeded, summary.errored) == (0, 4)
    for record in records(out).values():
        assert record["error"]["type"] == "ClusterError"
        assert "can hold an experiment of 2 GPU(s)" in record["error"]["message"]
        assert "--resume" in record["error"]["fix_suggestion"]
    assert ended_after < 60, f"the study took {ended_after:.0f}s to give up"
    assert labelled_containers(label) == []

    # The cluster grows back: resume runs exactly the four again, once each.
    cluster.add_node(num_cpus=4, num_gpus=2)
    cluster.wait_for_nodes()
    data["env"] = {"SLEEP": "0"}
    with anyio.fail_after(RESUME_BOUND_S):
        again = await run_study(
            Study.model_validate(data), out, cluster=cluster.address, resume=True
        )
    assert (again.succeeded, again.errored, again.skipped) == (4, 0, 0)
    assert all(r["status"] == "succeeded" for r in records(out).values())
    assert len(records(out)) == 4
    print(f"gave up {ended_after:.1f}s after the nodes left; resume ran all 4")


async def test_reap_cli_sweeps_every_host_of_the_cluster(
    fresh_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    """A container whose owner is gone is removed by `reap --ray` (run on each host)."""
    import subprocess
    import sys

    from tests.conftest import BUSYBOX_IMAGE

    cluster, _ = fresh_cluster
    label = f"llem.test.node={test_labels['llem.test.node']}"
    # An orphan as a killed worker leaves it: llem labels naming a pid that is gone.
    orphan = subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "--label",
            "llem.managed=1",
            "--label",
            label,
            "--label",
            f"llem.host={__import__('socket').gethostname()}",
            "--label",
            "llem.pid=999999",
            "--label",
            "llem.pid_start=1",
            BUSYBOX_IMAGE,
            "sleep",
            "300",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert labelled_containers(label) == [orphan[:12]]
    cli = [sys.executable, "-m", "llem_dispatch.cli", "reap", "--ray", cluster.address]
    proc = await anyio.run_process(cli, check=False, cwd=tmp_path)
    text = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, text
    assert orphan[:12] in text
    assert labelled_containers(label) == []
