"""doctor's verdict on the engine version: the 20.10 churn deadlock is named, with the fix."""

from __future__ import annotations

import pytest

from llem_dispatch.runners.docker_kind import engine_check as _engine_check


@pytest.mark.parametrize(
    ("version", "affected"),
    [
        ("20.10.24+dfsg1 (API 1.41)", True),
        ("19.03.15 (API 1.40)", True),
        ("23.0.1 (API 1.42)", False),
        ("26.1.5+dfsg1 (API 1.45)", False),
    ],
)
def test_engine_versions_with_the_deadlock_are_warned(version: str, affected: bool) -> None:
    check = _engine_check(version)
    assert check.ok is not affected
    assert check.optional, "a warning, not a failure: the dispatcher copes with a hang"
    if affected:
        assert "moby/moby#46661" in check.detail
        assert "Upgrade the engine" in check.fix


def test_unknown_version_is_not_a_verdict() -> None:
    assert _engine_check("answers /_ping").ok
