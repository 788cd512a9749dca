"""What a failed CLI call's stderr says: its tail, and which failure its text names.

Plain text rules with no classes of ours: `errors.translate_docker_error` turns the
class name found here into the class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["TIMEOUT_CODES", "capture_stderr_snippet", "class_named_by"]


def capture_stderr_snippet(stderr: str | bytes | Iterable[str], max_lines: int = 20) -> str:
    """Return the last `max_lines` non-empty lines of `stderr` as one string."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", errors="replace")
    lines = stderr.splitlines() if isinstance(stderr, str) else [s.rstrip("\n") for s in stderr]
    kept = [line for line in lines if line.strip()]
    return "\n".join(kept[-max_lines:]) if max_lines > 0 else ""


# Ordered: the first pattern that matches the stderr text wins. Text is the last
# resort; structured facts (status codes, State.OOMKilled) are checked first by
# the runners and never reach this table.
_STDERR_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(
            r"could not select device driver|nvidia-container-cli|unknown runtime.*nvidia|"
            r"no nvidia devices|libnvidia-ml",
            re.I,
        ),
        "DockerGPUAccessError",
    ),
    (
        re.compile(
            r"permission denied.*docker\.sock|docker\.sock.*permission denied|"
            r"permission denied while trying to connect to the docker (daemon|api)",
            re.I,
        ),
        "DockerPermissionError",
    ),
    (
        re.compile(
            r"cannot connect to the docker daemon|is the docker daemon running|"
            r"error during connect",
            re.I,
        ),
        "DockerUnavailableError",
    ),
    (
        re.compile(
            r"unable to find image|no such image|pull access denied|manifest unknown|"
            r"repository does not exist|manifest for .* not found|failed to resolve reference|"
            r"(image|reference|repository|manifest|tag)\b[^\n]*\bnot found",
            re.I,
        ),
        "DockerImagePullError",
    ),
    (
        re.compile(r"out of memory|oom-?kill|cannot allocate memory|CUDA out of memory", re.I),
        "DockerOOMError",
    ),
)

#: timeout(1)'s exit code, and the signals `subprocess.run(timeout=...)` kills with
#: (a negative return code is the signal number).
TIMEOUT_CODES = frozenset({124, -9, -15})


def class_named_by(stderr: str) -> str | None:
    """The name of the error class the stderr text points to (first match), if any."""
    return next((name for pattern, name in _STDERR_PATTERNS if pattern.search(stderr)), None)
