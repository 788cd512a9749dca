"""The HTML report opened as a reader opens it: in a browser (headless Chromium).

It must draw every chart from the inlined plotly.js (no network), log nothing
to the console, and leave a screenshot behind as a CI artifact.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import chromium_binary, make_quickstart_results

pytestmark = pytest.mark.browser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = chromium_binary()
    assert binary is not None
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
            "--disable-gpu",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={profile}",
            # Let plotly's scripts finish before the DOM or the picture is taken.
            "--virtual-time-budget=10000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_report_renders_in_chromium_without_console_errors(
    tmp_path: Path, artifact_path: Any
) -> None:
    pytest.importorskip("plotly", reason="the `analysis` extra is not installed")
    from llem_dispatch.report import read_results, short_keys, write_report

    out = await make_quickstart_results(tmp_path / "qs", trouble=True, gap_s=0.02)
    report = write_report(out)
    dom = chromium(tmp_path / "profile", "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "the report logged to the browser console:\n" + "\n".join(console)
    assert dom.stdout.count("js-plotly-plot") >= 3, "timeline + one chart per result field"
    assert dom.stdout.count('class="main-svg"') >= 6, "plotly drew every chart"
    shorts = short_keys(read_results(out).records).values()
    assert sum(f">{short}<" in dom.stdout for short in shorts) >= 6, "bars carry their keys"

    shot = artifact_path("report-quickstart.png")
    picture = chromium(
        tmp_path / "profile", "--window-size=1400,1800", f"--screenshot={shot}", report.as_uri()
    )
    assert picture.returncode == 0, picture.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 30_000, "a drawn page, not a blank one"
    print(f"report screenshot kept at {shot}")
