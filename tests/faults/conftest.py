"""Fixtures of the faults suite: a fault proxy in front of the real Docker daemon."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.docker_proxy import DockerFaultProxy, fault_proxy


@pytest.fixture
def docker_proxy() -> Iterator[DockerFaultProxy]:
    """A proxy to /var/run/docker.sock that stalls chosen calls; its socket path is short."""
    with (
        tempfile.TemporaryDirectory(prefix="llem-px-", dir="/tmp") as tmp,
        fault_proxy(Path(tmp)) as proxy,
    ):
        yield proxy
