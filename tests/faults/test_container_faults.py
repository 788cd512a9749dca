"""Misbehaving experiments, on both runners: SIGTERM ignored, silence, late and torn writes.

Faults 4 and 5 of the faults suite, plus result files that must never be trusted.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llem_dispatch import (
    DockerContainerError,
    DockerHangError,
    DockerRunner,
    DockerTimeoutError,
    ExperimentExitError,
    ExperimentHangError,
    ExperimentResult,
    ExperimentTimeoutError,
    ResultError,
)
from tests.integration.test_runner_contract import MakeRunner, make

pytestmark = pytest.mark.usefixtures("no_leaked_containers")
__all__ = ["make"]


async def test_timeout_even_if_sigterm_ignored(make: MakeRunner) -> None:
    t0 = time.monotonic()
    runner = make("trap '' TERM; sleep 600", timeout=1.5)
    with pytest.raises(ExperimentTimeoutError) as info:
        await runner.run({"e": 1})
    assert not isinstance(info.value, ExperimentHangError)
    # The neutral class from every runner; the Docker runner's own subclass from it.
    assert isinstance(info.value, DockerTimeoutError) == isinstance(runner, DockerRunner)
    assert time.monotonic() - t0 < 5


async def test_silence_limit_raises_hang_error(make: MakeRunner) -> None:
    t0 = time.monotonic()
    runner = make("echo start; sleep 600", silence_timeout=1.0, timeout=60)
    with pytest.raises(ExperimentHangError) as info:
        await runner.run({"f": 1})
    assert isinstance(info.value, ExperimentTimeoutError)
    assert isinstance(info.value, DockerHangError) == isinstance(runner, DockerRunner)
    assert time.monotonic() - t0 < 6
    assert "no output for 1.0s" in info.value.message


async def test_chatty_process_is_not_a_hang(make: MakeRunner) -> None:
    script = 'for i in 1 2 3 4 5 6; do echo tick; sleep 0.3; done; echo "{}" > "$LLEM_RESULT_PATH"'
    result = await make(script, silence_timeout=1.0).run({"g": 1})
    assert isinstance(result, ExperimentResult)


async def test_background_writer_after_exit_is_never_read(make: MakeRunner) -> None:
    # The main process exits 0 at once; a background child would write later. The
    # host reads only after exit (and the child dies with its group/container).
    script = '(sleep 2; echo "{\\"late\\": true}" > "$LLEM_RESULT_PATH") & exit 0'
    runner = make(script)
    with pytest.raises(ExperimentExitError, match="wrote no result") as info:
        await runner.run({"i": 1})
    assert isinstance(info.value, DockerContainerError) == isinstance(runner, DockerRunner)


async def test_half_written_result_is_rejected(make: MakeRunner) -> None:
    script = 'printf \'{"throughput": [1, 2, 3\' > "$LLEM_RESULT_PATH"'
    with pytest.raises(ResultError, match="truncated or half-written") as info:
        await make(script).run({"j": 1})
    assert info.value.exchange_dir is not None
    assert Path(info.value.exchange_dir).is_dir()


async def test_symlinked_result_is_never_followed(make: MakeRunner) -> None:
    with pytest.raises(ResultError, match="symbolic link"):
        await make('ln -s /etc/shadow "$LLEM_RESULT_PATH"').run({"k": 1})


async def test_oversized_result_is_rejected_and_kept(make: MakeRunner) -> None:
    script = (
        'yes x | head -c 3000 | tr -d "\\n" | sed "s/.*/{\\"x\\": \\"&\\"}/" > "$LLEM_RESULT_PATH"'
    )
    with pytest.raises(ResultError, match="over the 1024-byte cap") as info:
        await make(script, max_result_bytes=1024).run({"l": 1})
    assert info.value.exchange_dir is not None
    assert Path(info.value.exchange_dir).is_dir()


async def test_result_that_is_a_fifo_is_not_read(make: MakeRunner) -> None:
    with pytest.raises(ResultError, match="not a regular file"):
        await make('mkfifo "$LLEM_RESULT_PATH"').run({"m": 1})


async def test_tampered_exchange_dir_is_still_cleaned_up(
    make: MakeRunner, exchange_base: Path
) -> None:
    # Replaces its config, adds files and a link to a host file, locks a subdir,
    # then succeeds: the host uses the config it wrote, follows nothing, removes all.
    script = (
        'echo "{\\"evil\\": true}" > "$LLEM_CONFIG_PATH"; '
        'mkdir "$LLEM_EXCHANGE_DIR/junk"; echo x > "$LLEM_EXCHANGE_DIR/junk/f"; '
        'ln -s /etc/passwd "$LLEM_EXCHANGE_DIR/container.orphan.log"; '
        'chmod 000 "$LLEM_EXCHANGE_DIR/junk"; '
        'echo "{\\"ok\\": 1}" > "$LLEM_RESULT_PATH"'
    )
    passwd_before = Path("/etc/passwd").read_bytes()
    result = await make(script).run({"n": 1})
    assert isinstance(result, ExperimentResult)
    assert result.effective_config["n"] == 1
    assert "evil" not in result.effective_config
    assert [p for p in exchange_base.iterdir() if p.name.startswith("llem-")] == []
    assert Path("/etc/passwd").read_bytes() == passwd_before
