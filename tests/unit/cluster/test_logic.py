"""The cluster backend's pure logic: error round trips, address checks, node-aware display.

What needs a real cluster (placement, cancellation, node loss) is in tests/cluster.
"""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime

import pytest

from llem_dispatch.cli import ProgressState, record_row
from llem_dispatch.cluster.connection import probe_address
from llem_dispatch.cluster.node import error_payload
from llem_dispatch.cluster.placement import node_error
from llem_dispatch.dispatch import (
    ExperimentFinished,
    ExperimentStarted,
    NodeInfo,
    RetryPolicy,
    RunRecord,
)
from llem_dispatch.errors import (
    ClusterError,
    ClusterNodeLostError,
    DockerContainerError,
    DockerImagePullError,
    ResultError,
)
from llem_dispatch.reap import reap

NODE = NodeInfo(hostname="gpu-7", node_id="ab12cd34ef" * 4, ip="10.0.0.7")


def test_node_label_is_short_and_tells_nodes_of_one_host_apart() -> None:
    other = NodeInfo(hostname="gpu-7", node_id="ffee" * 10)
    assert NODE.label == "gpu-7[ab12cd]"
    assert NODE.label != other.label


def test_a_node_side_docker_error_comes_back_as_the_same_class_naming_the_node() -> None:
    original = DockerContainerError(
        "container exited with code 3",
        stderr_snippet="boom",
        container_id="c" * 64,
        exchange_dir="/tmp/llem-x",
        exit_code=3,
        log_path="/tmp/llem-x/container.log",
        config_hash="0123456789abcdef",
    )
    rebuilt = node_error(error_payload(original), NODE)
    assert type(rebuilt) is DockerContainerError
    assert rebuilt.message == "container exited with code 3 [on node gpu-7[ab12cd]]"
    assert rebuilt.fix_suggestion == original.fix_suggestion
    assert (rebuilt.stderr_snippet, rebuilt.exit_code) == ("boom", 3)
    assert (rebuilt.container_id, rebuilt.exchange_dir) == ("c" * 64, "/tmp/llem-x")
    assert rebuilt.config_hash == "0123456789abcdef"


def test_missing_image_on_a_node_keeps_its_class_and_fix() -> None:
    payload = error_payload(DockerImagePullError("No such image: bench:1"))
    rebuilt = node_error(payload, NODE)
    assert isinstance(rebuilt, DockerImagePullError)
    assert "gpu-7" in rebuilt.message
    assert "docker build" in rebuilt.fix_suggestion


def test_non_docker_and_unknown_errors() -> None:
    rebuilt = node_error(error_payload(ResultError("half-written")), None)
    assert type(rebuilt) is ResultError
    assert rebuilt.message == "half-written"
    # A class the driver does not know (or a plain exception) becomes a ClusterError.
    assert type(node_error({"type": "os.system", "message": "x"}, NODE)) is ClusterError
    plain = node_error(error_payload(KeyError("k")), NODE)
    assert type(plain) is ClusterError
    assert "KeyError" in plain.message


def test_a_lost_node_is_retried_and_other_cluster_errors_are_not() -> None:
    policy = RetryPolicy()
    assert policy.should_retry(ClusterNodeLostError("node died"))
    assert not policy.should_retry(ClusterError("task failed"))


@pytest.mark.parametrize("address", ["nohost", "ray://", "host:port", "http//x"])
def test_malformed_addresses_are_named(address: str) -> None:
    with pytest.raises(ClusterError, match="is not HOST:PORT"):
        probe_address(address)


def test_an_address_nothing_listens_at_fails_in_seconds_with_the_fix() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ClusterError, match="nothing answers") as info:
        probe_address(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 6
    assert "ray start --head" in info.value.fix_suggestion


def test_a_listening_address_and_auto_pass() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        probe_address(f"127.0.0.1:{port}")
        probe_address(f"ray://127.0.0.1:{port}")
    probe_address("auto")
    probe_address(None)


def test_display_keeps_gpu_0_of_two_nodes_apart() -> None:
    a, b = NODE, NodeInfo(hostname="gpu-7", node_id="99" * 20)
    state = ProgressState(total=2)
    state.apply(ExperimentStarted("a" * 16, ("0",), 1, None, None, {"key": "ka"}, a.label))
    state.apply(ExperimentStarted("b" * 16, ("0",), 1, None, None, {"key": "kb"}, b.label))
    assert set(state.running) == {f"{a.label}:0", f"{b.label}:0"}
    now = datetime.now(UTC)
    done = RunRecord(
        config_hash="a" * 16,
        config={},
        status="succeeded",
        gpu_ids=["0"],
        queued_at=now,
        tags={"key": "ka"},
        node=a,
    )
    state.apply(ExperimentFinished(done))
    assert set(state.running) == {f"{b.label}:0"}


async def test_end_of_study_sweep_needs_a_results_dir() -> None:
    with pytest.raises(ValueError, match="needs results_dir"):
        await reap(study_over=True)


def test_results_rows_of_a_cluster_run_name_the_node() -> None:
    data = {"key": "k", "gpu_ids": ["1"], "node": NODE.model_dump()}
    row = record_row(data)
    assert row["node"] == NODE.label
    assert row["gpu_ids"] == "1"
    assert "node" not in record_row({"key": "k", "gpu_ids": ["1"]})
