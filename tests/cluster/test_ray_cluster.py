"""Studies on a real 2-node Ray cluster (2 logical GPUs each) through real Docker containers."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from llem_dispatch import RayPlacement, Study, run_study
from llem_dispatch.errors import GpuRequestError
from tests.cluster.conftest import (
    GPUS_PER_NODE,
    RESULT,
    journal,
    records,
    run_argv,
    study_dict,
    wait_running,
)
from tests.conftest import interrupt_and_wait, labelled_containers

#: How long stopping a study of these files (stop_grace_s: 2) may take, every step
#: within its own bound: under load a task's drain can take far longer than the grace.
STOP_BOUND_S = RayPlacement.stop_bound_s(2.0, None)

pytestmark = [
    pytest.mark.ray,
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.usefixtures("ray_cluster", "no_leaked_containers"),
]


def _t(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end before a start at the same time)."""
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, step in points:
        current += step
        best = max(best, current)
    return best


async def test_sweep_uses_every_gpu_of_both_nodes_and_never_shares_one(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    cluster, _ = ray_cluster
    cooldown = 1.0

    # Timing marks as any program may write them: the phases come back from the node.
    def mark(name: str) -> str:
        json_line = '{"mark": "' + name + '", "t": %s}\\n'
        return "printf '" + json_line + '\' "$(date +%s)" >> "$LLEM_MARKS_PATH"; '

    marks = "".join(mark(name) for name in ("start", "ready", "work"))
    script = marks + "sleep 2; " + mark("done") + RESULT
    study = Study.model_validate(study_dict(test_labels, script, n=16, experiment_gap_s=cooldown))
    out = tmp_path / "out"
    summary = await run_study(study, out, cluster=cluster.address)

    assert (summary.succeeded, summary.failed, summary.errored) == (16, 0, 0)
    recs = records(out)
    assert len(recs) == 16
    nodes = {r["node"]["node_id"] for r in recs.values()}
    assert len(nodes) == 2, f"expected both worker nodes used, got {nodes}"
    by_gpu: dict[tuple[str, str], list[tuple[float, float]]] = {}
    rested: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in recs.values():
        assert r["status"] == "succeeded"
        assert len(r["gpu_ids"]) == 1
        assert r["gpu_ids"][0] in {str(i) for i in range(GPUS_PER_NODE)}
        # The container saw exactly the GPU Ray assigned on its node.
        assert r["result"]["data"]["gpu"] == r["gpu_ids"][0]
        assert r["image_digest"], "every record names the image digest"
        assert r["runner_type"] == "docker"
        assert r["node"]["hostname"]
        # The same phase fields as a local run's, through the one attempt report.
        assert r["prepare_s"] is not None
        assert r["work_started_at"] is not None
        assert r["work_ended_at"] is not None
        by_gpu.setdefault((r["node"]["node_id"], r["gpu_ids"][0]), []).append(
            (_t(r["started_at"]), _t(r["exited_at"]))
        )
        rested.setdefault((r["node"]["node_id"], r["gpu_ids"][0]), []).append(
            (_t(r["started_at"]), _t(r["work_ended_at"]))
        )
    assert len(by_gpu) == 2 * GPUS_PER_NODE, f"all 4 GPUs used: {sorted(by_gpu)}"
    for gpu, spans in by_gpu.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"GPU {gpu} was shared"
        # The GPU rested for the cooldown from the end of the work (its `done` mark).
        for (_, done), (start, _) in itertools.pairwise(sorted(rested[gpu])):
            assert start >= done + cooldown * 0.95, f"GPU {gpu}: next run {start - done:.2f}s after"
    everything = [span for spans in by_gpu.values() for span in spans]
    assert max_overlap(everything) == 4, "all 4 GPUs busy at once at some point"
    events = [e["event"] for e in journal(out)]
    assert events.count("succeeded") == 16
    assert all("node" in e for e in journal(out) if e["event"] == "started")
    assert labelled_containers(f"llem.test.node={test_labels['llem.test.node']}") == []


async def test_failure_record_names_the_node_that_keeps_its_exchange_dir(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    cluster, _ = ray_cluster
    script = 'if [ "$I" = 1 ]; then echo boom >&2; exit 3; fi; ' + RESULT
    study = Study.model_validate(study_dict(test_labels, script, n=2, retries=0))
    out = tmp_path / "out"
    summary = await run_study(study, out, cluster=cluster.address)
    assert (summary.succeeded, summary.errored) == (1, 1)
    bad = next(r for r in records(out).values() if r["status"] != "succeeded")
    assert bad["error"]["type"] == "DockerContainerError"
    assert "[on node " in bad["error"]["message"]
    assert "boom" in bad["error"]["stderr_snippet"]
    assert bad["node"]["hostname"]
    # The node is this host here, so the kept dir is in the results dir, with its log.
    kept = Path(bad["exchange_dir"])
    assert kept.is_dir()
    assert kept.parent == out / "exchange"
    assert "boom" in (kept / "container.log").read_text()


@pytest.mark.timeout(STOP_BOUND_S + 180)
async def test_cancelling_a_study_removes_its_containers_on_the_nodes(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    cluster, _ = ray_cluster
    label = f"llem.test.node={test_labels['llem.test.node']}"
    study = Study.model_validate(study_dict(test_labels, "sleep 60; " + RESULT, n=8))
    out = tmp_path / "out"
    cancelled_at = 0.0
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(run_study, study, out, cluster=cluster.address))
        with anyio.fail_after(60):
            while len(labelled_containers(label, running_only=True)) < 4:
                await anyio.sleep(0.2)
        cancelled_at = time.monotonic()
        tg.cancel_scope.cancel()
    took = time.monotonic() - cancelled_at
    # SIGTERM is ignored by sh as pid 1: SIGKILL after the 2 s grace, then removal
    # (seconds when idle). What must hold under any load: done within the bound, and
    # nothing left.
    print(f"\ncancelling took {took:.1f}s")
    assert took < STOP_BOUND_S, f"cancelling took {took:.1f}s"
    assert labelled_containers(label) == [], "containers left after the study was cancelled"
    events = journal(out)
    assert events[-1]["event"] == "interrupted"
    assert len(events[-1]["in_flight"]) == 8
    assert records(out) == {}


async def test_an_experiment_larger_than_any_node_fails_at_once(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    cluster, _ = ray_cluster
    study = Study.model_validate(study_dict(test_labels, RESULT, n=1, gpus=GPUS_PER_NODE + 1))
    with anyio.fail_after(30), pytest.raises(GpuRequestError, match="largest node") as info:
        await run_study(study, tmp_path / "out", cluster=cluster.address)
    assert "never spans nodes" in info.value.message
    assert not (tmp_path / "out" / "records").exists() or not any(
        (tmp_path / "out" / "records").iterdir()
    )


async def test_a_node_without_the_image_is_named_before_anything_runs(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    from llem_dispatch.errors import ClusterError

    cluster, _ = ray_cluster
    data = study_dict(test_labels, RESULT, n=2)
    data["image"] = "llem-test/not-built-anywhere:1"
    with anyio.fail_after(60), pytest.raises(ClusterError) as info:
        await run_study(Study.model_validate(data), tmp_path / "out", cluster=cluster.address)
    message = info.value.message
    assert "image llem-test/not-built-anywhere:1 is not there" in message
    assert "nothing was run" in message
    assert "node " in message
    assert "Build or pull the image" in info.value.fix_suggestion
    assert not (tmp_path / "out" / "journal.jsonl").exists()


async def test_library_map_streams_records_with_their_nodes(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    from llem_dispatch.cluster import NodeContext, RayDispatcher
    from llem_dispatch.dispatch import ExperimentStarted
    from llem_dispatch.runners.docker import DockerRunner
    from tests.conftest import BUSYBOX_IMAGE

    cluster, _ = ray_cluster
    make = partial(
        DockerRunner,
        BUSYBOX_IMAGE,
        command=["sh", "-c", 'echo "{\\"ok\\": 1}" > "$LLEM_RESULT_PATH"'],
        gpu_passthrough=False,
        network="none",
        shm_size="16m",
        labels=test_labels,
        exchange_base=tmp_path,
    )

    def factory(node: NodeContext) -> DockerRunner:
        return make()

    started: list[ExperimentStarted] = []
    async with RayDispatcher(factory, address=cluster.address) as dispatcher:
        dispatcher.subscribe(
            lambda e: started.append(e) if isinstance(e, ExperimentStarted) else None
        )
        got = [r async for r in dispatcher.map([{"n": i} for i in range(6)], gpus=1)]
    assert sorted(r.config["n"] for r in got) == list(range(6))
    assert all(r.ok and r.node is not None and r.result is not None for r in got)
    assert {e.node for e in started} <= {r.node.label for r in got if r.node}
    assert len(started) == 6
    with contextlib.suppress(StopIteration):
        assert next(r for r in got if r.result is not None).result["data"] == {"ok": 1}


def write_study_file(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def test_cli_run_on_the_cluster_with_ray_flag(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    import sys

    cluster, _ = ray_cluster
    study_file = write_study_file(tmp_path / "study.yaml", study_dict(test_labels, RESULT, n=4))
    cli = [sys.executable, "-m", "llem_dispatch.cli", "run", str(study_file), "--plain"]
    with anyio.fail_after(120):
        proc = await anyio.run_process(
            [*cli, "--ray", cluster.address, "--results", str(tmp_path / "out")], check=False
        )
    text = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 0, text
    assert "4 succeeded" in text
    recs = records(tmp_path / "out")
    assert len(recs) == 4
    assert all(r["node"] and r["status"] == "succeeded" for r in recs.values())
    study_json = json.loads((tmp_path / "out" / "study.json").read_text())
    assert study_json["cluster"] == cluster.address
    assert sorted(study_json["cluster_gpus"].values()) == [0, GPUS_PER_NODE, GPUS_PER_NODE]

    # Host GPU options make no sense on a cluster: a usage error, nothing run.
    bad = await anyio.run_process(
        [*cli, "--ray", cluster.address, "--virtual-gpus", "2", "--results", str(tmp_path / "x")],
        check=False,
    )
    assert bad.returncode == 2
    assert "Ray assigns them" in " ".join((bad.stdout + bad.stderr).decode().split())
    assert not (tmp_path / "x").exists()


async def test_cli_names_an_unreachable_cluster_in_seconds(tmp_path: Path) -> None:
    import socket
    import sys

    # A port with nothing listening: bind and close to find a free one.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    study_file = write_study_file(
        tmp_path / "study.yaml", study_dict({}, RESULT, n=1, cluster=f"127.0.0.1:{port}")
    )
    started = time.monotonic()
    with anyio.fail_after(60):
        proc = await anyio.run_process(
            [
                sys.executable,
                "-m",
                "llem_dispatch.cli",
                "run",
                str(study_file),
                "--plain",
                "--results",
                str(tmp_path / "out"),
            ],
            check=False,
        )
    text = proc.stdout.decode() + proc.stderr.decode()
    assert proc.returncode == 2, text
    said = " ".join(text.split())
    assert "nothing answers at the Ray address" in said
    assert "ray start --head" in said
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out" / "records").exists()


@pytest.mark.timeout(STOP_BOUND_S + 180)
async def test_ctrl_c_on_the_cli_driver_stops_every_container_on_the_nodes(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    import subprocess

    cluster, _ = ray_cluster
    label = f"llem.test.node={test_labels['llem.test.node']}"
    # The containers trap TERM and leave a marker: proof they were stopped gracefully.
    script = (
        "trap 'touch \"$LLEM_EXCHANGE_DIR/got-term\"; exit 143' TERM; sleep 60 & wait; " + RESULT
    )
    study_file = write_study_file(tmp_path / "study.yaml", study_dict(test_labels, script, n=6))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        run_argv(study_file, cluster.address, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        await wait_running(label, 4, proc)
        took, text = interrupt_and_wait(proc, STOP_BOUND_S + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\nexit took {took:.1f}s")
    assert proc.returncode == 130, text
    assert "clean-up did not finish" not in text, text
    assert labelled_containers(label) == [], "containers left on the nodes' daemon"
    assert len(list((out / "exchange").glob("llem-*/got-term"))) == 4
    events = journal(out)
    assert events[-1]["event"] == "interrupted"
    assert records(out) == {}


#: The resumed study: its start-of-study sweep (the placement's own bound) reaps the
#: orphans, then six short experiments run on 4 GPUs.
RESUME_BOUND_S = RayPlacement.STUDY_SWEEP_S + 90


# The test's limit follows its parts' bounds: containers up (90 s), the resume.
@pytest.mark.timeout(90 + 30 + RESUME_BOUND_S + 30)
async def test_driver_killed_then_resume_reaps_and_runs_each_experiment_once(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    import signal
    import subprocess
    from collections import Counter

    cluster, _ = ray_cluster
    label = f"llem.test.node={test_labels['llem.test.node']}"
    data = study_dict(test_labels, 'sleep "$SLEEP"; ' + RESULT, n=6, env={"SLEEP": "30"})
    study_file = write_study_file(tmp_path / "study.yaml", data)
    out = tmp_path / "out"
    cli = run_argv(study_file, cluster.address, out)
    proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_running(label, 4, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    orphans = labelled_containers(label)
    assert len(orphans) >= 4, "the killed driver could not clean up: its containers remain"

    write_study_file(study_file, {**data, "env": {"SLEEP": "0"}})
    with anyio.fail_after(RESUME_BOUND_S):
        again = await anyio.run_process([*cli, "--resume"], check=False)
    text = (again.stdout + again.stderr).decode()
    assert again.returncode == 0, text
    assert "6 succeeded" in " ".join(text.split())
    print("\n".join(line for line in text.splitlines() if "orphan" in line))
    assert "cluster_orphan_reaped" in text, "the resume's sweep should have said what it removed"
    assert labelled_containers(label) == [], "orphans of the killed driver are left"
    events = journal(out)
    assert [e["event"] for e in events].count("study_started") == 2
    succeeded = Counter(e["key"] for e in events if e["event"] == "succeeded")
    assert len(succeeded) == 6
    assert set(succeeded.values()) == {1}
    assert len(records(out)) == 6


async def test_doctor_checks_every_host_of_the_cluster(
    ray_cluster: tuple[Any, list[Any]], tmp_path: Path, test_labels: dict[str, str]
) -> None:
    import sys

    cluster, _ = ray_cluster
    good = write_study_file(tmp_path / "good.yaml", study_dict(test_labels, RESULT, n=1))
    bad = write_study_file(
        tmp_path / "bad.yaml",
        {**study_dict(test_labels, RESULT, n=1), "image": "llem-test/not-built-anywhere:2"},
    )
    doctor = [sys.executable, "-m", "llem_dispatch.cli", "doctor", "--ray", cluster.address]
    with anyio.fail_after(120):
        ok = await anyio.run_process([*doctor, str(good)], check=False)
        missing = await anyio.run_process([*doctor, str(bad)], check=False)
    ok_text = " ".join((ok.stdout + ok.stderr).decode().split())
    assert ok.returncode == 0, ok_text
    assert "PASS Ray cluster: 3 node(s)" in ok_text
    assert "Docker daemon: answers" in ok_text
    assert "images: all present" in ok_text
    missing_text = " ".join((missing.stdout + missing.stderr).decode().split())
    assert missing.returncode == 1, missing_text
    assert "FAIL" in missing_text
    assert "missing: llem-test/not-built-anywhere:2" in missing_text
