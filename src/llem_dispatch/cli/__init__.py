"""The `llem-dispatch` command: run a study with live progress, results, report, doctor, reap.

Exit codes: 0 all succeeded, 1 some experiments failed, 2 bad usage or study
file, 130 interrupted.
"""

from llem_dispatch.cli import doctor, reap, report, results, run  # noqa: F401 - registers commands
from llem_dispatch.cli.app import app, main
from llem_dispatch.cli.progress import LiveDisplay, ProgressState
from llem_dispatch.cli.results import record_row

__all__ = ["LiveDisplay", "ProgressState", "app", "main", "record_row"]
