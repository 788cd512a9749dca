"""The interference benchmark's mechanisms on the CPU (no GPU, no Docker): a paused
neighbour is frozen and moves again once continued; a confined one runs where asked;
the schedule pairs every condition with an alone window beside it, in both orders."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from benchmarks import interference as bench
from benchmarks._common import Context

pytestmark = pytest.mark.timeout(60)

#: Bound on a fresh neighbour's first chunk (interpreter start and imports included).
START_BOUND_S = 30.0

NeighbourFactory = Callable[..., bench.Neighbour]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[NeighbourFactory]:
    """Start neighbours on a small file; every one is killed and reaped afterwards."""
    weights = tmp_path / "weights.bin"
    bench.write_raw_weights(weights, 8)
    started: list[bench.Neighbour] = []

    def make(name: str, confine: bench.Confinement | None = None) -> bench.Neighbour:
        neighbour = bench.Neighbour(name, tmp_path, weights, "read", confine)
        started.append(neighbour)
        assert neighbour.wait_progress(0, START_BOUND_S), neighbour.log_path.read_text()
        return neighbour

    yield make
    for neighbour in started:
        neighbour.close()


def test_schedule_pairs_each_condition_beside_an_alone_window_in_alternating_order() -> None:
    slots = bench.schedule(6)
    assert len(slots) == 6 * 6
    for condition in bench.CONDITIONS:
        mine = [(i, s) for i, s in enumerate(slots) if s.condition == condition]
        assert len(mine) == 6
        for index, slot in mine:
            assert slot.partner is not None
            assert slots[slot.partner].condition == bench.ALONE
            assert slot.partner == (index + 1 if slot.first else index - 1)
        order = [slot.first for _, slot in mine]
        assert order == [order[0], not order[0]] * 3


def test_pause_freezes_the_neighbour_and_resume_moves_it_again(
    spawn: NeighbourFactory,
) -> None:
    neighbour = spawn("plain")
    for _ in range(3):
        neighbour.pause()
        assert bench.all_threads_stopped(neighbour.pid)
        progress, ticks = neighbour.progress(), neighbour.cpu_ticks()
        loop = bench.PythonLoop()
        loop.chunks = 10
        loop.window()  # a measured window's work while it is stopped
        assert (neighbour.progress(), neighbour.cpu_ticks()) == (progress, ticks)
        neighbour.resume()
        assert neighbour.wait_progress(progress, bench.RESUME_BOUND_S)


def test_confined_neighbour_runs_on_its_cores_at_nice_19_in_the_idle_io_class(
    spawn: NeighbourFactory,
) -> None:
    _, theirs = bench.split_cpus(sorted(os.sched_getaffinity(0)))
    confine = bench.Confinement(theirs)
    neighbour = spawn("confined", confine)
    assert confine.read_back(neighbour.pid) is None
    environ = Path(f"/proc/{neighbour.pid}/environ").read_bytes().split(b"\0")
    assert f"OMP_NUM_THREADS={len(theirs)}".encode() in environ


def test_split_cpus_gives_each_side_half() -> None:
    mine, theirs = bench.split_cpus(list(range(16)))
    assert len(mine) == len(theirs) == 8
    assert not set(mine) & set(theirs)
    assert bench.split_cpus([3]) == ((3,), (3,))


def test_cpu_variant_passes_its_functional_checks(tmp_path: Path) -> None:
    ctx = Context(name=bench.NAME, smoke=True, workdir=tmp_path)
    settings = dataclasses.replace(
        bench.default_settings("cpu", smoke=True),
        rounds=2,
        window_s=0.1,
        gap_s=0.02,
        neighbour_mb=8,
    )
    anyio.run(bench.measure, ctx, settings)
    verdicts = {v.metric: v for v in ctx.verdicts}
    # Whether a nice-19 neighbour got CPU inside 0.2 s depends on the machine's load;
    # these three do not.
    for metric, verdict in verdicts.items():
        if metric.startswith(("neighbours frozen", "neighbour's counter moved", "cpu confinement")):
            assert verdict.passed, verdict
    assert len([m for m in verdicts if not m.startswith("neighbours worked")]) == 3
