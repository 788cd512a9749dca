"""The cluster preflight's verdict: each host's answers, read through the runner kinds."""

from __future__ import annotations

import pytest

from llem_dispatch.cluster.hosts import NodeCheck, unready_error
from llem_dispatch.dispatch import NodeInfo

NODE = NodeInfo(hostname="gpu-1", node_id="aa" * 20, ip="10.0.0.1")


def check(docker: bool, images: tuple[str, ...] = (), paths: tuple[str, ...] = ()) -> NodeCheck:
    return NodeCheck(NODE, {"docker": docker}, list(images), list(paths))


def test_explicit_docker_needs_the_daemon_then_the_images() -> None:
    down = unready_error([check(False)], runner_kind="docker", folder="/s")
    assert down is not None
    assert "no Docker daemon answers there" in down.message
    missing = unready_error([check(True, ["i:1"])], runner_kind="docker", folder="/s")
    assert missing is not None
    assert "image i:1 is not there" in missing.message
    assert unready_error([check(True)], runner_kind="docker", folder="/s") is None


def test_explicit_local_needs_only_the_folder() -> None:
    # The daemon's answer (and the images) do not matter to a host process.
    bad = unready_error([check(False, ["i:1"], ["/s"])], runner_kind="local", folder="/s")
    assert bad is not None
    assert "the study folder /s does not exist there" in bad.message
    assert "Docker" not in bad.message.split(":", 1)[1]


@pytest.mark.parametrize(
    ("docker", "has_image", "problem"),
    [
        (True, True, "image i:1 is not there"),
        (False, True, "study folder /s does not exist"),
        (True, False, "study folder /s does not exist"),
    ],
)
def test_auto_is_decided_per_host(docker: bool, has_image: bool, problem: str) -> None:
    node = check(docker, ["i:1"], ["/s"])
    error = unready_error([node], runner_kind="auto", folder="/s", has_image=has_image)
    assert error is not None
    assert problem in error.message
    assert node.kind("auto", has_image=has_image).name == (
        "docker" if problem[0] == "i" else "local"
    )
