"""The engine probe asks the engine it is given, not the docker CLI's default (real daemon)."""

from __future__ import annotations

import pytest

from llem_dispatch._docker import docker_available

pytestmark = [pytest.mark.docker]


def test_a_non_socket_url_is_asked_itself_not_the_local_daemon() -> None:
    assert docker_available(timeout=10)  # the local daemon answers
    # Nothing listens there: the CLI must be pointed at it, not fall back to the socket.
    assert not docker_available(timeout=10, url="tcp://127.0.0.1:9")
