"""`PrepareDepth`: the `auto` prestart depth from measured prepare and run times."""

from __future__ import annotations

import pytest

from llem_dispatch.dispatch.depth import MAX_AUTO_DEPTH, PrepareDepth


def test_a_preparation_shorter_than_a_run_stays_one_ahead() -> None:
    depth = PrepareDepth()
    assert depth.observe(prepare_s=3.0, held_s=8.0, cooldown_s=2.0) == 1


@pytest.mark.parametrize(
    ("prepare_s", "expected"),
    [(9.0, 2), (15.0, 2), (17.0, 3), (25.0, 4), (100.0, MAX_AUTO_DEPTH)],
)
def test_the_depth_covers_the_preparation_with_a_margin(prepare_s: float, expected: int) -> None:
    # Each run ahead has held_s + cooldown = 10 s to prepare in; 25% margin.
    assert PrepareDepth().observe(prepare_s=prepare_s, held_s=8.0, cooldown_s=2.0) == expected


def test_windows_that_freeze_preparation_shorten_the_span_of_an_unfrozen_run() -> None:
    # 10 s span of which 6 s is a measured window: 4 s left, 7 s of preparation -> 3.
    assert (
        PrepareDepth().observe(
            prepare_s=7.0, held_s=8.0, cooldown_s=2.0, window_s=6.0, frozen_in_windows=True
        )
        == 3
    )
    # A prestarted run's preparation already includes its frozen time: the whole span.
    assert PrepareDepth().observe(prepare_s=7.0, held_s=8.0, cooldown_s=2.0, window_s=6.0) == 1


def test_it_never_goes_back_and_late_runs_deepen_it() -> None:
    depth = PrepareDepth()
    assert depth.observe(prepare_s=17.0, held_s=8.0, cooldown_s=2.0) == 3
    assert depth.observe(prepare_s=1.0, held_s=8.0, cooldown_s=2.0) == 3
    assert depth.late() == 4
    assert depth.late() == MAX_AUTO_DEPTH


def test_missing_marks_change_nothing() -> None:
    depth = PrepareDepth()
    assert depth.observe(prepare_s=None, held_s=8.0, cooldown_s=2.0) == 1
    assert depth.observe(prepare_s=30.0, held_s=None, cooldown_s=2.0) == 1
    assert depth.observe(prepare_s=30.0, held_s=0.0, cooldown_s=0.0) == 1
