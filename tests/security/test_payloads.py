"""Secrets in pieces, and payloads built to eat memory: redacted and bounded everywhere."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from llem_dispatch import Dispatcher, GpuPool, LocalRunner
from llem_dispatch._logcapture import LogCapture
from llem_dispatch._logging import _secrets, register_secret
from llem_dispatch.dispatch import ErrorInfo
from llem_dispatch.errors import DockerContainerError

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz012345"


@pytest.fixture
def token() -> Iterator[str]:
    register_secret(TOKEN)
    yield TOKEN
    _secrets.discard(TOKEN)


def test_a_token_written_in_two_pieces_never_reaches_the_log(tmp_path: Path, token: str) -> None:
    capture = LogCapture(tmp_path / "container.log")
    capture.feed("stdout", "loading with token=" + token[:9])
    capture.feed("stdout", token[9:] + " ok\nnext line\n")
    capture.feed("stderr", "warning: " + token[:20])
    capture.feed("stderr", token[20:])  # the stream ends inside no newline
    capture.close()
    text = (tmp_path / "container.log").read_text()
    assert token not in text
    assert token[:9] not in text, "not even its first piece"
    assert text.count("***") == 2
    assert "next line" in text
    assert token not in capture.tail("stderr")


def test_container_log_keeps_head_and_tail_within_its_cap(tmp_path: Path) -> None:
    capture = LogCapture(tmp_path / "container.log", max_bytes=1000)
    for i in range(1000):
        capture.feed("stdout", f"line {i:04d} of a flood\n")
    capture.close()
    text = (tmp_path / "container.log").read_text()
    assert len(text) < 1100
    assert text.startswith("line 0000")
    assert text.rstrip().endswith("line 0999 of a flood")
    assert "characters of output omitted" in text


def test_error_info_is_redacted_and_bounded(token: str) -> None:
    exc = DockerContainerError(
        f"failed with {token} " + "x" * 5_000_000, stderr_snippet=f"auth {token}"
    )
    info = ErrorInfo.from_exception(exc)
    assert token not in info.message
    assert token not in (info.stderr_snippet or "")
    assert len(info.message) < 70_000
    assert "truncated" in info.message


def test_a_huge_error_payload_is_bounded_in_the_record_and_redacted(
    tmp_path: Path, token: str
) -> None:
    # 20 MB message, 5 MB traceback, a token in both: under the 64 MiB result cap.
    script = (
        "import json, os; p = os.environ['LLEM_ERROR_PATH']; "
        f"json.dump({{'type': 'ValueError', 'message': 'bad {token} ' + 'm' * 20_000_000, "
        f"'traceback': 'Traceback {token}\\n' + 't' * 5_000_000}}, open(p, 'w')); "
        "raise SystemExit(1)"
    )
    runner = LocalRunner([sys.executable, "-c", script], exchange_base=tmp_path)

    async def main() -> list[object]:
        async with Dispatcher(runner, pool=GpuPool.virtual_devices(1)) as dispatcher:
            return [await dispatcher.run({"i": i}) for i in range(3)]

    records = anyio.run(main)
    for record in records:
        failure = record.failure  # type: ignore[attr-defined]
        assert failure is not None
        assert len(failure.message) < 70_000
        assert failure.traceback is not None
        assert len(failure.traceback) < 70_000
        assert token not in failure.message + failure.traceback
        dumped = json.dumps(record.model_dump(mode="json"))  # type: ignore[attr-defined]
        assert len(dumped) < 200_000, "the record file stays small"


@pytest.mark.parametrize("chunk", [7, 64, 333, 5000])
def test_the_kept_tail_is_exactly_the_last_of_the_output(tmp_path: Path, chunk: int) -> None:
    stream = "".join(f"<{i}>" for i in range(3000))
    capture = LogCapture(tmp_path / "container.log", max_bytes=2000)
    for start in range(0, len(stream), chunk):
        capture.feed("stdout", stream[start : start + chunk])
    capture.close()
    text = (tmp_path / "container.log").read_text()
    head, _, rest = text.partition("\n[... ")
    marker, _, tail = rest.partition(" ...]\n")
    assert head == stream[:1000]
    assert tail == stream[-1000:]
    assert marker == f"{len(stream) - 2000} characters of output omitted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["container.log"], "spill files gone"
