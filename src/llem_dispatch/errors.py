"""The error hierarchy of llem-dispatch, and how raw Docker failures map onto it.

Every infrastructure failure is raised as one of these classes, each carrying
a one-line fix suggestion and the context a user needs to act on it::

    LlemError
    ├── ConfigError                       bad study file / config / runner value
    │   └── ResultsDirBusyError           another run holds the results dir's lock
    ├── ResultError                       result file unreadable, malformed, off-schema
    ├── GpuRequestError                   more GPUs asked for than the pool has
    ├── ClusterError                      the Ray cluster could not run an experiment
    │   └── ClusterNodeLostError          its node or worker died mid-run (retried)
    └── DockerError                       anything that went wrong running a container
        ├── DockerImagePullError          image missing locally and not pullable
        ├── DockerGPUAccessError          no NVIDIA runtime / device not selectable
        ├── DockerOOMError                killed by the kernel's OOM killer
        ├── DockerTimeoutError            our own timeout killed it
        │   └── DockerHangError           no output for longer than the silence limit
        ├── DockerPermissionError         socket permission denied
        │   └── DockerUnavailableError    daemon not running / unreachable
        │       └── DockerDaemonHungError daemon answers, but one API call never returns
        └── DockerContainerError          any other non-zero exit, or no result file

Experiments that report their own failure (an error payload) are not errors:
they come back as `ExperimentFailure` values.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "ClusterError",
    "ClusterNodeLostError",
    "ConfigError",
    "DockerContainerError",
    "DockerDaemonHungError",
    "DockerError",
    "DockerGPUAccessError",
    "DockerHangError",
    "DockerImagePullError",
    "DockerOOMError",
    "DockerPermissionError",
    "DockerTimeoutError",
    "DockerUnavailableError",
    "GpuRequestError",
    "LlemError",
    "ResultError",
    "ResultsDirBusyError",
    "capture_stderr_snippet",
    "translate_docker_error",
]

STDERR_TAIL_LINES = 20
#: Context some error classes carry beyond LlemError's own, in their payloads too.
_EXTRA_FIELDS = ("stderr_snippet", "container_id", "exit_code", "log_path", "node")


class LlemError(Exception):
    """Root of every error llem-dispatch raises on purpose."""

    default_fix: str = "See the message above."

    def __init__(
        self,
        message: str,
        *,
        fix_suggestion: str | None = None,
        config_hash: str | None = None,
        exchange_dir: str | Path | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.fix_suggestion = fix_suggestion or self.default_fix
        self.config_hash = config_hash
        self.exchange_dir = str(exchange_dir) if exchange_dir is not None else None

    def to_payload(self) -> dict[str, Any]:
        """The error as plain JSON data (records, the cluster's wire); see `from_payload`."""
        payload: dict[str, Any] = {
            "type": type(self).__name__,
            "message": self.message,
            "fix_suggestion": self.fix_suggestion,
            "config_hash": self.config_hash,
            "exchange_dir": self.exchange_dir,
        }
        for name in _EXTRA_FIELDS:
            if hasattr(self, name):
                payload[name] = getattr(self, name)
        return payload

    @staticmethod
    def from_payload(payload: Mapping[str, Any], *, suffix: str = "") -> LlemError:
        """Rebuild the error `to_payload` described, as its own class where it is ours.

        An unknown `type` comes back as a `ClusterError` holding the type in its
        message; `suffix` is appended to the message (e.g. where it happened).
        """
        cls = globals().get(str(payload.get("type")))
        message = str(payload.get("message", ""))
        if not (isinstance(cls, type) and issubclass(cls, LlemError)):
            cls, message = ClusterError, f"{payload.get('type')}: {message}"
        kwargs = {
            name: payload.get(name)
            for name in ("fix_suggestion", "config_hash", "exchange_dir", *_EXTRA_FIELDS)
            if name in inspect.signature(cls.__init__).parameters
        }
        return cls(message + suffix, **kwargs)

    def __str__(self) -> str:
        parts = [self.message, f"Fix: {self.fix_suggestion}"]
        if self.exchange_dir:
            parts.append(f"Exchange dir kept: {self.exchange_dir}")
        return "\n".join(parts)


class ConfigError(LlemError, ValueError):
    """A config, study file or option is invalid; the message names the field."""

    default_fix = "Correct the field named above and run again."


class ResultsDirBusyError(ConfigError):
    """Another llem-dispatch run holds the results dir (its lock names the holder)."""

    default_fix = (
        "Wait for that run to finish, or use another --results dir. A run that was "
        "killed releases the lock at once, so --resume works right after it."
    )


class ResultError(LlemError):
    """The experiment's result file is missing, unsafe, too large or malformed."""

    default_fix = (
        "Make the experiment write one JSON object to $LLEM_RESULT_PATH atomically "
        "(write a temp file in $LLEM_EXCHANGE_DIR, then rename it)."
    )


class GpuRequestError(LlemError, ValueError):
    """An experiment asked for more GPUs than the pool can ever give it."""

    default_fix = "Ask for at most as many GPUs as the pool has, or add GPUs to the pool."


class ClusterError(LlemError):
    """The Ray cluster could not be reached, or could not run an experiment."""

    default_fix = (
        "Check the cluster (`ray status`), that every node has llem-dispatch installed, "
        "and the address given to --ray / `cluster:`."
    )
    transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        fix_suggestion: str | None = None,
        config_hash: str | None = None,
        exchange_dir: str | Path | None = None,
        node: str | None = None,
    ) -> None:
        super().__init__(
            message,
            fix_suggestion=fix_suggestion,
            config_hash=config_hash,
            exchange_dir=exchange_dir,
        )
        self.node = node


class ClusterNodeLostError(ClusterError):
    """The node (or worker process) running an experiment died; it is run again elsewhere."""

    transient = True
    default_fix = (
        "Nothing to do if a retry succeeded; otherwise check why the node left "
        "(`ray status`, its raylet log) and run the study again with --resume."
    )


class DockerError(LlemError):
    """A container could not be created, started, or did not finish cleanly."""

    default_fix = "Check `docker info` and the container log kept in the exchange dir."
    #: Worth retrying: the daemon was unreachable or answered 5xx (not the GPU error).
    transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        fix_suggestion: str | None = None,
        stderr: str | None = None,
        stderr_snippet: str | None = None,
        container_id: str | None = None,
        exchange_dir: str | Path | None = None,
        config_hash: str | None = None,
        exit_code: int | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        super().__init__(
            message,
            fix_suggestion=fix_suggestion,
            config_hash=config_hash,
            exchange_dir=exchange_dir,
        )
        if stderr_snippet is None and stderr is not None:
            stderr_snippet = capture_stderr_snippet(stderr)
        #: None when no stderr was given (llenergymeasure's contract), else its tail.
        self.stderr_snippet: str | None = stderr_snippet or None
        self.container_id = container_id
        self.exit_code = exit_code
        self.log_path = str(log_path) if log_path is not None else None

    def __str__(self) -> str:
        text = super().__str__()
        if self.container_id:
            text += f"\nContainer: {self.container_id[:12]}"
        if self.stderr_snippet:
            text += "\nLast stderr lines:\n" + self.stderr_snippet
        return text


class DockerImagePullError(DockerError):
    """The image is not present locally and could not be pulled."""

    default_fix = (
        "Build the image locally (`docker build -t IMAGE .`) or pull it "
        "(`docker pull IMAGE`) on a host that can reach its registry."
    )


class DockerGPUAccessError(DockerError):
    """The daemon cannot hand GPUs to containers (no NVIDIA Container Toolkit)."""

    default_fix = (
        "Install the NVIDIA Container Toolkit and restart dockerd "
        "(`nvidia-ctk runtime configure --runtime=docker`), or run without GPU "
        "passthrough (gpu_passthrough=False / --virtual-gpus) on a host without GPUs."
    )


class DockerOOMError(DockerError):
    """The container was killed for exceeding its memory limit."""

    default_fix = (
        "Lower the batch size or sequence length, or raise the container memory "
        "limit (mem_limit) / free host memory."
    )


class DockerTimeoutError(DockerError):
    """The container outran its timeout and was killed by the dispatcher."""

    default_fix = "Raise the timeout (timeout=/--timeout) or shrink the experiment."


class DockerHangError(DockerTimeoutError):
    """The container printed nothing for longer than the silence limit and was killed."""

    default_fix = (
        "Find where the experiment hangs (its log is kept in the exchange dir), "
        "print progress more often, or raise silence_timeout."
    )


class DockerPermissionError(DockerError):
    """The Docker socket refused us (permission denied)."""

    default_fix = (
        "Add your user to the `docker` group (`sudo usermod -aG docker $USER`, then "
        "log in again) or point DOCKER_HOST at a socket you may use."
    )


class DockerUnavailableError(DockerPermissionError):
    """The Docker daemon is not running or cannot be reached."""

    transient = True

    default_fix = (
        "Start the Docker daemon (`sudo systemctl start docker` or `dockerd &`) and "
        "check DOCKER_HOST; or use the local runner (--runner local)."
    )


class DockerDaemonHungError(DockerUnavailableError):
    """A Docker API call passed its deadline: the daemon is stuck (transient, retried)."""

    transient = True

    default_fix = (
        "The Docker daemon is stuck; restart it (`sudo systemctl restart docker`), then "
        "continue with --resume. Docker Engine 20.10.x before the libnetwork fix "
        "(moby/moby#46661) is known to deadlock under container churn: upgrade it."
    )


class DockerContainerError(DockerError):
    """The container exited non-zero, or exited 0 without writing a result."""

    default_fix = "Read the container log kept in the exchange dir; the stderr tail is below."


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
_STDERR_PATTERNS: tuple[tuple[re.Pattern[str], type[DockerError]], ...] = (
    (
        re.compile(
            r"could not select device driver|nvidia-container-cli|unknown runtime.*nvidia|"
            r"no nvidia devices|libnvidia-ml",
            re.I,
        ),
        DockerGPUAccessError,
    ),
    (
        re.compile(
            r"permission denied.*docker\.sock|docker\.sock.*permission denied|"
            r"permission denied while trying to connect to the docker (daemon|api)",
            re.I,
        ),
        DockerPermissionError,
    ),
    (
        re.compile(
            r"cannot connect to the docker daemon|is the docker daemon running|"
            r"error during connect",
            re.I,
        ),
        DockerUnavailableError,
    ),
    (
        re.compile(
            r"unable to find image|no such image|pull access denied|manifest unknown|"
            r"repository does not exist|manifest for .* not found|failed to resolve reference|"
            r"(image|reference|repository|manifest|tag)\b[^\n]*\bnot found",
            re.I,
        ),
        DockerImagePullError,
    ),
    (
        re.compile(r"out of memory|oom-?kill|cannot allocate memory|CUDA out of memory", re.I),
        DockerOOMError,
    ),
)


#: timeout(1)'s exit code, and the signals `subprocess.run(timeout=...)` kills with
#: (a negative return code is the signal number).
_TIMEOUT_CODES = frozenset({124, -9, -15})


def translate_docker_error(returncode: int, stderr: str | None, image: str) -> DockerError:
    """Classify a failed `docker` CLI call from its exit code and stderr.

    For callers that only have a return code and stderr text (subprocess users);
    the API-based runners classify from structured facts instead.
    """
    stderr = stderr or ""
    snippet = capture_stderr_snippet(stderr) or None
    matched = [cls for pattern, cls in _STDERR_PATTERNS if pattern.search(stderr)]
    cls = matched[0] if matched else (DockerOOMError if returncode == 137 else DockerContainerError)
    if returncode in _TIMEOUT_CODES and cls is DockerContainerError:
        cls = DockerTimeoutError
    fix = cls.default_fix.replace("IMAGE", image) if cls is DockerImagePullError else None
    return cls(
        f"docker run of {image} failed with exit code {returncode} ({cls.__name__})",
        fix_suggestion=fix,
        stderr_snippet=snippet,
        exit_code=returncode,
    )
