"""Errors across the Ray boundary: a node's `error_payload`, the driver's `node_error`.

The node sends each error as `error_payload(exc)` inside a message (Ray pickles
it; JSON is stricter, so the tests pass it through JSON too) and the driver
raises `node_error(payload, node)`: the same class, fields and transience, so
the retry policy decides on the driver exactly as it would on the node's host.
"""

from __future__ import annotations

import json
from typing import Any

import aiodocker
import pytest

from llem_dispatch._docker import translate_api_error
from llem_dispatch.cluster.node import error_payload
from llem_dispatch.cluster.placement import node_error
from llem_dispatch.dispatch import NodeInfo, RetryPolicy
from llem_dispatch.errors import ClusterError, DockerError, LlemError, RunnerError
from tests.unit.test_errors import every_error_class

NODE = NodeInfo(hostname="gpu-7", node_id="ab12cd34ef" * 4, ip="10.0.0.7")


def across(exc: BaseException) -> LlemError:
    """`exc` raised on a node, as the driver raises it."""
    message = {"kind": "error", "node": NODE.model_dump(), "error": error_payload(exc)}
    wire: dict[str, Any] = json.loads(json.dumps(message))
    return node_error(wire["error"], NodeInfo.model_validate(wire["node"]))


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("transient", [None, True, False])
def test_every_class_comes_back_whole(cls: type[LlemError], transient: bool | None) -> None:
    extra: dict[str, Any] = {}
    if issubclass(cls, RunnerError):
        extra = {"stderr_snippet": "tail", "container_id": "c" * 64, "exit_code": 3}
    original = cls("it broke", config_hash="0123456789abcdef", transient=transient, **extra)
    rebuilt = across(original)
    assert type(rebuilt) is cls
    assert rebuilt.message == "it broke [on node gpu-7[ab12cd]]"
    assert rebuilt.transient is original.transient
    assert rebuilt.fix_suggestion == original.fix_suggestion
    sent, back = original.to_payload(), rebuilt.to_payload()
    assert {k: v for k, v in back.items() if k not in {"message", "node"}} == {
        k: v for k, v in sent.items() if k not in {"message", "node"}
    }
    policy = RetryPolicy(retry_timeouts=True)
    assert policy.should_retry(rebuilt) is policy.should_retry(original)


@pytest.mark.parametrize(("status", "retried"), [(500, True), (503, True), (409, False)])
def test_a_daemon_5xx_on_a_node_is_retried_as_on_this_host(status: int, retried: bool) -> None:
    # Built exactly as the Docker runner builds it from aiodocker's error.
    here = translate_api_error(
        aiodocker.DockerError(status, "driver failed programming external connectivity"),
        image="img:1",
        phase="start",
    )
    assert type(here) is DockerError
    there = across(here)
    assert type(there) is DockerError
    assert RetryPolicy().should_retry(here) is retried
    assert RetryPolicy().should_retry(there) is retried


def test_a_foreign_exception_is_a_cluster_error_that_is_not_retried() -> None:
    rebuilt = across(KeyError("k"))
    assert type(rebuilt) is ClusterError
    assert not RetryPolicy().should_retry(rebuilt)
