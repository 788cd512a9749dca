"""A real multi-node Ray cluster on this machine (Ray's own `cluster_utils.Cluster`).

Each worker node is a separate raylet with 2 logical GPUs; every node talks to
this host's one Docker daemon, as each host of a real cluster talks to its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import BUSYBOX_IMAGE, labelled_containers

GPUS_PER_NODE = 2
RESULT = (
    'echo "{\\"i\\": $I, \\"gpu\\": \\"$LLEM_GPU_IDS\\"}" > "$LLEM_EXCHANGE_DIR/t"; '
    'mv "$LLEM_EXCHANGE_DIR/t" "$LLEM_RESULT_PATH"'
)
GET_I = 'I=$(sed "s/[^0-9]//g" "$LLEM_CONFIG_PATH"); '


def start_cluster(workers: int = 2) -> tuple[Any, list[Any]]:
    import ray
    from ray.cluster_utils import Cluster

    # The head holds the driver and no GPUs; experiments land on the workers.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    nodes = [cluster.add_node(num_cpus=4, num_gpus=GPUS_PER_NODE) for _ in range(workers)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    return cluster, nodes


def stop_cluster(cluster: Any) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[tuple[Any, list[Any]]]:
    cluster, nodes = start_cluster()
    yield cluster, nodes
    stop_cluster(cluster)


def study_dict(
    labels: dict[str, str], script: str, *, n: int, gpus: int = 1, **extra: Any
) -> dict[str, Any]:
    return {
        "name": "cluster",
        "image": BUSYBOX_IMAGE,
        "runner": "docker",
        "command": ["sh", "-c", GET_I + script],
        "gpus_per_experiment": gpus,
        "network": "none",
        "shm_size": "16m",
        "stop_grace_s": 2,
        "labels": labels,
        "grid": {"i": list(range(n))},
        **extra,
    }


def records(out: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}


def journal(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]


def run_argv(study_file: Path, address: str, out: Path) -> list[str]:
    """`llem-dispatch run` of a study on the cluster, plain output, results in `out`."""
    return [
        sys.executable, "-m", "llem_dispatch.cli", "run", str(study_file), "--plain",
        "--ray", address, "--results", str(out),
    ]  # fmt: skip


async def wait_running(label: str, count: int, proc: subprocess.Popen[Any]) -> None:
    """Until `count` containers with `label` run (bounded); the CLI must not have exited."""
    with anyio.fail_after(90):
        while len(labelled_containers(label, running_only=True)) < count:
            assert proc.poll() is None, f"the CLI exited with {proc.returncode}"
            await anyio.sleep(0.2)
