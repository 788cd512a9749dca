"""Remake the README's screenshots: the live display (tmux) and the quickstart's report.

Needs tmux, headless Chromium and the `analysis` extra. Runs the quickstart with
the local runner (no Docker needed), under a real terminal for the live display:

    python docs/screenshots.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
STUDY = REPO / "examples" / "quickstart" / "study.yaml"
CLI = f"{sys.executable} -m llem_dispatch.cli"
WIDTH, HEIGHT = 110, 14


def chromium(*args: str) -> None:
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=10000",
            *args,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def live_frame(results: Path) -> str:
    """A frame of the live display mid-run (some done, some running, some queued).

    The run is left to finish: its results dir makes the report's screenshot.
    """
    session = "llem-screenshot"
    subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
    command = f"cd {REPO} && {CLI} run {STUDY} --runner local --results {results}; sleep 30"
    subprocess.run(
        ["tmux", "new", "-d", "-s", session, "-x", str(WIDTH), "-y", str(HEIGHT), command],
        check=True,
    )
    best = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            frame = subprocess.run(
                ["tmux", "capture-pane", "-p", "-e", "-t", session],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            plain = re.sub(r"\x1b\[[0-9;]*m", "", frame)
            counts = re.search(r"(\d+) done · (\d+) failed · (\d+) running · (\d+) queued", plain)
            wanted = counts and int(counts[1]) >= 3 and int(counts[3]) >= 3 and int(counts[4])
            if wanted and (not best or re.search(r"ETA \d", plain)):
                best = frame
            if "succeeded, " in plain:  # the summary: the run is over
                break
            time.sleep(0.1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, check=False)
    if not best:
        raise SystemExit("no mid-run frame caught; run again")
    return best


def terminal_png(ansi: str, target: Path) -> None:
    console = Console(record=True, width=WIDTH, force_terminal=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(Text.from_ansi(ansi.rstrip("\n")))
    svg = target.with_suffix(".svg")
    console.save_svg(str(svg), title="llem-dispatch run examples/quickstart/study.yaml")
    width, height = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg.read_text()).groups()
    chromium(
        f"--window-size={int(float(width))},{int(float(height))}",
        f"--screenshot={target}",
        svg.as_uri(),
    )
    svg.unlink()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="llem-shots-"))
    try:
        terminal_png(live_frame(work / "live"), DOCS / "live-display.png")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "llem_dispatch.cli",
                "report",
                str(work / "live"),
                "-o",
                str(work / "report.html"),
            ],
            check=True,
        )
        chromium(
            "--window-size=1400,1250",
            f"--screenshot={DOCS / 'report-quickstart.png'}",
            (work / "report.html").as_uri(),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {DOCS / 'live-display.png'} and {DOCS / 'report-quickstart.png'}")


if __name__ == "__main__":
    main()
