"""The error hierarchy of llem-dispatch, and how raw Docker failures map onto it.

Every infrastructure failure is raised as one of these classes, each carrying
a one-line fix suggestion and the context a user needs to act on it::

    LlemError
    ├── ConfigError                       bad study file / config / runner value
    │   └── ResultsDirBusyError           another run holds the results dir's lock
    ├── ResultError                       result file unreadable, malformed, off-schema
    ├── GpuRequestError                   more GPUs asked for than the pool has
    ├── ClusterError                      the cluster (Ray, Slurm) could not run an experiment
    │   ├── ClusterNodeLostError          its node or worker died mid-run (retried)
    │   └── ClusterJobCancelledError      its job was cancelled from outside (scancel)
    └── RunnerError                       a runner could not run an experiment to its end
        ├── ExperimentStartError          its process/container could not start
        │   └── GpuAccessError            the engine cannot hand it its GPUs
        ├── ImageError                    its image is missing and cannot be had
        ├── ExperimentTimeoutError        our own timeout killed it
        │   └── ExperimentHangError       no output for longer than the silence limit
        ├── ExperimentOOMError            killed by the kernel's OOM killer
        ├── ExperimentExitError           non-zero exit, or exit 0 without a result
        ├── EnginePermissionError         the engine (socket, service) refused us
        ├── EngineUnavailableError        the engine is not running / unreachable (retried)
        │   └── EngineHungError           it answers, but one call never returns (retried)
        └── DockerError                   the Docker runner's failures, each below its
            │                             neutral class too (in brackets):
            ├── DockerImagePullError      (ImageError)
            ├── DockerGPUAccessError      (GpuAccessError) no NVIDIA runtime / device
            ├── DockerOOMError            (ExperimentOOMError)
            ├── DockerTimeoutError        (ExperimentTimeoutError)
            │   └── DockerHangError       (ExperimentHangError)
            ├── DockerPermissionError     (EnginePermissionError) socket permission denied
            ├── DockerUnavailableError    (EngineUnavailableError) daemon down / unreachable
            │   └── DockerDaemonHungError (EngineHungError) one API call never returns
            ├── DockerContainerError      (ExperimentExitError)
            └── PodmanError               a Podman run's failures, each below its
                │                         Docker class too (in brackets):
                ├── PodmanImagePullError  (DockerImagePullError)
                ├── PodmanGPUAccessError  (DockerGPUAccessError)
                ├── PodmanOOMError        (DockerOOMError)
                ├── PodmanTimeoutError    (DockerTimeoutError)
                │   └── PodmanHangError   (DockerHangError)
                ├── PodmanPermissionError (DockerPermissionError)
                ├── PodmanUnavailableError (DockerUnavailableError)
                │   └── PodmanServiceHungError (DockerDaemonHungError)
                └── PodmanContainerError  (DockerContainerError)

Catch the neutral class to handle a failure whatever ran it (`except
ExperimentTimeoutError` catches a local run's timeout and `DockerTimeoutError`);
catch `DockerError` or a Docker class for the container runner's own, whatever
its engine (`except DockerTimeoutError` catches `PodmanTimeoutError`); the edge
picks the engine's class with `DockerError.for_engine`. Each Docker
class lists its neutral base first: `DockerTimeoutError(ExperimentTimeoutError,
DockerError)` has the MRO DockerTimeoutError, ExperimentTimeoutError,
DockerError, RunnerError, LlemError, so the Docker class's own `default_fix`
wins, then the neutral meaning, then the Docker runner's shared behaviour. The
local runner raises only the neutral classes.

Experiments that report their own failure (an error payload) are not errors:
they come back as `ExperimentFailure` values.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from llem_dispatch._stderr_text import TIMEOUT_CODES, capture_stderr_snippet, class_named_by

__all__ = [
    "ClusterError",
    "ClusterJobCancelledError",
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
    "EngineHungError",
    "EnginePermissionError",
    "EngineUnavailableError",
    "ExperimentExitError",
    "ExperimentHangError",
    "ExperimentOOMError",
    "ExperimentStartError",
    "ExperimentTimeoutError",
    "GpuAccessError",
    "GpuRequestError",
    "ImageError",
    "LlemError",
    "PodmanContainerError",
    "PodmanError",
    "PodmanGPUAccessError",
    "PodmanHangError",
    "PodmanImagePullError",
    "PodmanOOMError",
    "PodmanPermissionError",
    "PodmanServiceHungError",
    "PodmanTimeoutError",
    "PodmanUnavailableError",
    "ResultError",
    "ResultsDirBusyError",
    "RunnerError",
    "capture_stderr_snippet",
    "error_payload",
    "translate_docker_error",
]

STDERR_TAIL_LINES = 20
#: Context some error classes carry beyond LlemError's own, in their payloads too.
_EXTRA_FIELDS = ("stderr_snippet", "container_id", "exit_code", "log_path", "node")


class LlemError(Exception):
    """Root of every error llem-dispatch raises on purpose.

    `transient` says the failure is worth another attempt (an engine down or
    answering 5xx); a class sets its default, an instance may differ from it.
    """

    default_fix: str = "See the message above."
    transient: bool = False

    def __init__(
        self,
        message: str,
        *,
        fix_suggestion: str | None = None,
        config_hash: str | None = None,
        exchange_dir: str | Path | None = None,
        transient: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.fix_suggestion = fix_suggestion or self.default_fix
        self.config_hash = config_hash
        self.exchange_dir = str(exchange_dir) if exchange_dir is not None else None
        if transient is not None:
            self.transient = transient

    def to_payload(self) -> dict[str, Any]:
        """The error as plain JSON data (records, the cluster's wire); see `from_payload`."""
        payload: dict[str, Any] = {
            "type": type(self).__name__,
            "message": self.message,
            "fix_suggestion": self.fix_suggestion,
            "config_hash": self.config_hash,
            "exchange_dir": self.exchange_dir,
            "transient": self.transient,
        }
        for name in _EXTRA_FIELDS:
            if hasattr(self, name):
                payload[name] = getattr(self, name)
        return payload

    @staticmethod
    def from_payload(payload: Mapping[str, Any], *, suffix: str = "") -> LlemError:
        """Rebuild the error `to_payload` described, as its own class where it is ours.

        An unknown `type` comes back as a `ClusterError` holding the type in its
        message; `suffix` is appended to the message (e.g. where it happened). A
        payload without `transient` (an older sender) gets the class's default.
        """
        cls = _error_class(str(payload.get("type")))
        message = str(payload.get("message", ""))
        if cls is None:
            cls, message = ClusterError, f"{payload.get('type')}: {message}"
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {
            name: payload.get(name)
            for name in ("fix_suggestion", "config_hash", "exchange_dir", *_EXTRA_FIELDS)
            if name in accepted
        }
        transient = payload.get("transient")
        if isinstance(transient, bool) and "transient" in accepted:
            kwargs["transient"] = transient
        return cls(message + suffix, **kwargs)

    def __str__(self) -> str:
        parts = [self.message, f"Fix: {self.fix_suggestion}"]
        if self.exchange_dir:
            parts.append(f"Exchange dir kept: {self.exchange_dir}")
        return "\n".join(parts)


def _subclasses(cls: type[LlemError]) -> Iterator[type[LlemError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _error_class(name: str) -> type[LlemError] | None:
    """Our class of that name: this module's first, then any other package's subclass."""
    ours = globals().get(name)
    if isinstance(ours, type) and issubclass(ours, LlemError):
        return ours
    return next((cls for cls in _subclasses(LlemError) if cls.__name__ == name), None)


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
    """The cluster (Ray, Slurm) could not be reached, or could not run an experiment."""

    default_fix = (
        "Check the cluster (`ray status`), that every node has llem-dispatch installed, "
        "and the address given to --ray / `cluster:`."
    )

    def __init__(
        self,
        message: str,
        *,
        fix_suggestion: str | None = None,
        config_hash: str | None = None,
        exchange_dir: str | Path | None = None,
        node: str | None = None,
        transient: bool | None = None,
    ) -> None:
        super().__init__(
            message,
            fix_suggestion=fix_suggestion,
            config_hash=config_hash,
            exchange_dir=exchange_dir,
            transient=transient,
        )
        self.node = node


class ClusterNodeLostError(ClusterError):
    """The node (or worker process) running an experiment died; it is run again elsewhere."""

    transient = True
    default_fix = (
        "Nothing to do if a retry succeeded; otherwise check why the node left "
        "(`ray status`, its raylet log) and run the study again with --resume."
    )


class ClusterJobCancelledError(ClusterError):
    """The cluster's scheduler cancelled the experiment's job, and we did not ask it to."""

    default_fix = (
        "Someone (a user, an admin, a reservation) cancelled the job: `scontrol show job "
        "ID` says who if it is still known; run the study again with --resume."
    )


# -- runner-neutral failures of a run ------------------------------------------------


class RunnerError(LlemError):
    """A runner (any kind) could not run an experiment to its end.

    Carries what the run left: the tail of its stderr, its exit code, its log and,
    for container runners, the container id.
    """

    default_fix = "Read the experiment's log kept in the exchange dir."

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
        transient: bool | None = None,
    ) -> None:
        super().__init__(
            message,
            fix_suggestion=fix_suggestion,
            config_hash=config_hash,
            exchange_dir=exchange_dir,
            transient=transient,
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


class ExperimentStartError(RunnerError):
    """The experiment's process or container could not be started."""

    default_fix = "Check that the experiment's command exists and can run here."


class GpuAccessError(ExperimentStartError):
    """The runner's engine cannot hand the experiment the GPUs it was given."""

    default_fix = "Check the host's GPU driver and the engine's GPU support."


class ImageError(RunnerError):
    """The experiment's image is not present and could not be built or pulled."""

    default_fix = "Build or pull the image on this host first."


class ExperimentTimeoutError(RunnerError):
    """The experiment outran its timeout and was killed by the dispatcher."""

    default_fix = "Raise the timeout (timeout_s / --timeout) or shrink the experiment."


class ExperimentHangError(ExperimentTimeoutError):
    """The experiment printed nothing for longer than the silence limit and was killed."""

    default_fix = (
        "Find where the experiment hangs (its log is kept in the exchange dir), "
        "print progress more often, or raise silence_timeout."
    )


class ExperimentOOMError(RunnerError):
    """The experiment was killed by the kernel's out-of-memory killer."""

    default_fix = "Lower the batch size or sequence length, or free host memory."


class ExperimentExitError(RunnerError):
    """The experiment exited non-zero, or exited 0 without writing a result."""

    default_fix = "Read the experiment's log kept in the exchange dir; the stderr tail is below."


class EnginePermissionError(RunnerError):
    """The engine that runs experiments refused us access (its socket or service)."""

    default_fix = "Get access to the engine's socket or service, or use another runner."


class EngineUnavailableError(RunnerError):
    """The engine that runs experiments is not running or cannot be reached (retried)."""

    transient = True
    default_fix = "Start the engine, or use another runner (--runner local)."


class EngineHungError(EngineUnavailableError):
    """The engine answers, but one of its calls passed its deadline (retried).

    A study stops dispatching when this outlasts the retries: every later run
    would only hang too.
    """

    transient = True
    default_fix = "Restart the engine, then continue with --resume."


# -- the Docker runner's classes (the seed's names, llenergymeasure's contract) ------


class DockerError(RunnerError):
    """A container could not be created, started, or did not finish cleanly."""

    default_fix = "Check `docker info` and the container log kept in the exchange dir."
    #: Worth retrying: the daemon was unreachable or answered 5xx (not the GPU error).
    transient: bool = False
    #: The engine (`ContainerEngine.name`) whose runs raise this class.
    engine_name: ClassVar[str] = "Docker"

    @classmethod
    def for_engine(cls, engine: str) -> type[Self]:
        """This class as a run on `engine` raises it (`PodmanTimeoutError` for "Podman"):
        its subclass of that engine, else itself."""
        if engine == cls.engine_name:
            return cls
        return next((sub for sub in cls.__subclasses__() if sub.engine_name == engine), cls)


class DockerImagePullError(ImageError, DockerError):
    """The image is not present locally and could not be pulled."""

    default_fix = (
        "Build the image locally (`docker build -t IMAGE .`) or pull it "
        "(`docker pull IMAGE`) on a host that can reach its registry."
    )


class DockerGPUAccessError(GpuAccessError, DockerError):
    """The daemon cannot hand GPUs to containers (no NVIDIA Container Toolkit)."""

    default_fix = (
        "Install the NVIDIA Container Toolkit and restart dockerd "
        "(`nvidia-ctk runtime configure --runtime=docker`), or run without GPU "
        "passthrough (gpu_passthrough=False / --virtual-gpus) on a host without GPUs."
    )


class DockerOOMError(ExperimentOOMError, DockerError):
    """The container was killed for exceeding its memory limit."""

    default_fix = (
        "Lower the batch size or sequence length, or raise the container memory "
        "limit (mem_limit) / free host memory."
    )


class DockerTimeoutError(ExperimentTimeoutError, DockerError):
    """The container outran its timeout and was killed by the dispatcher."""

    default_fix = "Raise the timeout (timeout=/--timeout) or shrink the experiment."


class DockerHangError(ExperimentHangError, DockerTimeoutError):
    """The container printed nothing for longer than the silence limit and was killed."""

    default_fix = (
        "Find where the experiment hangs (its log is kept in the exchange dir), "
        "print progress more often, or raise silence_timeout."
    )


class DockerPermissionError(EnginePermissionError, DockerError):
    """The Docker socket refused us (permission denied)."""

    default_fix = (
        "Add your user to the `docker` group (`sudo usermod -aG docker $USER`, then "
        "log in again) or point DOCKER_HOST at a socket you may use."
    )


class DockerUnavailableError(EngineUnavailableError, DockerError):
    """The Docker daemon is not running or cannot be reached."""

    transient = True

    default_fix = (
        "Start the Docker daemon (`sudo systemctl start docker` or `dockerd &`) and "
        "check DOCKER_HOST; or use the local runner (--runner local)."
    )


class DockerDaemonHungError(EngineHungError, DockerUnavailableError):
    """A Docker API call passed its deadline: the daemon is stuck (transient, retried)."""

    transient = True

    default_fix = (
        "The Docker daemon is stuck; restart it (`sudo systemctl restart docker`), then "
        "continue with --resume. Docker Engine 20.10.x before the libnetwork fix "
        "(moby/moby#46661) is known to deadlock under container churn: upgrade it."
    )


class DockerContainerError(ExperimentExitError, DockerError):
    """The container exited non-zero, or exited 0 without writing a result."""

    default_fix = "Read the container log kept in the exchange dir; the stderr tail is below."


# -- Podman's twins: `except DockerX` still catches them; records and logs say Podman ------


class PodmanError(DockerError):
    """A Podman container could not be created, started, or did not finish cleanly."""

    engine_name = "Podman"
    default_fix = "Check `podman info` and the container log kept in the exchange dir."


class PodmanImagePullError(DockerImagePullError, PodmanError):
    """The image is not in Podman's store and could not be built or pulled."""

    default_fix = "Build the image with Podman (`podman build -t IMAGE .`) or pull it there."


class PodmanGPUAccessError(DockerGPUAccessError, PodmanError):
    """Podman cannot hand GPUs to containers (no CDI spec for them)."""

    default_fix = (
        "Generate the NVIDIA CDI spec (`sudo nvidia-ctk cdi generate --output="
        "/etc/cdi/nvidia.yaml`), or run without GPU passthrough on a host without GPUs."
    )


class PodmanOOMError(DockerOOMError, PodmanError):
    """The Podman container was killed for exceeding its memory limit."""


class PodmanTimeoutError(DockerTimeoutError, PodmanError):
    """The Podman container outran its timeout and was killed by the dispatcher."""


class PodmanHangError(DockerHangError, PodmanTimeoutError):
    """The Podman container printed nothing for longer than the silence limit."""


class PodmanPermissionError(DockerPermissionError, PodmanError):
    """Podman's API socket refused us (permission denied)."""

    default_fix = "Use a Podman socket you may open (--engine-url), e.g. your user's own."


class PodmanUnavailableError(DockerUnavailableError, PodmanError):
    """Podman's API service is not running or cannot be reached."""

    default_fix = (
        "Start Podman's API service (`podman system service --time=0 unix:///PATH &` or "
        "`systemctl --user start podman.socket`) and check --engine-url."
    )


class PodmanServiceHungError(DockerDaemonHungError, PodmanUnavailableError):
    """A Podman API call passed its deadline: the service is stuck (transient, retried)."""

    default_fix = "Restart Podman's API service, then continue with --resume."


class PodmanContainerError(DockerContainerError, PodmanError):
    """The Podman container exited non-zero, or exited 0 without writing a result."""


def translate_docker_error(returncode: int, stderr: str | None, image: str) -> DockerError:
    """Classify a failed `docker` CLI call from its exit code and stderr.

    For callers that only have a return code and stderr text (subprocess users);
    the API-based runners classify from structured facts instead.
    """
    stderr = stderr or ""
    snippet = capture_stderr_snippet(stderr) or None
    named = class_named_by(stderr)
    default = DockerOOMError if returncode == 137 else DockerContainerError
    cls: type[DockerError] = globals()[named] if named else default
    if returncode in TIMEOUT_CODES and cls is DockerContainerError:
        cls = DockerTimeoutError
    fix = cls.default_fix.replace("IMAGE", image) if cls is DockerImagePullError else None
    return cls(
        f"docker run of {image} failed with exit code {returncode} ({cls.__name__})",
        fix_suggestion=fix,
        stderr_snippet=snippet,
        exit_code=returncode,
    )


def error_payload(exc: BaseException) -> dict[str, Any]:
    """An exception raised on a node as plain data for the driver.

    Ours travel as `LlemError.to_payload()` (the driver rebuilds them with
    `LlemError.from_payload`); anything else as a `ClusterError` naming its type.
    """
    if not isinstance(exc, LlemError):
        exc = ClusterError(f"{type(exc).__name__}: {exc}")
    return exc.to_payload()
