"""The per-experiment exchange directory: config in, result or error payload out.

Owns the host side of the container protocol's files: creating the dir,
writing the config and secrets, reading results without trusting the
container (no symlinks followed, size capped), and cleanup.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from llem_dispatch.errors import ResultError
from llem_dispatch.models import canonical_json

__all__ = [
    "CONTAINER_EXCHANGE_DIR",
    "DEFAULT_MAX_RESULT_BYTES",
    "ExchangeDir",
    "ReadOutcome",
    "atomic_write",
    "remove_tree",
]

CONTAINER_EXCHANGE_DIR = "/run/llem"
SECRETS_FILENAME = ".llem-secrets.json"
LOG_FILENAME = "container.log"
#: The gate's go file: a prestarted experiment waits for it before touching a GPU.
GO_FILENAME = ".llem-go"
#: A FIFO beside the go file: a gate blocked reading it wakes when the gate opens,
#: where polling the go file would cost CPU beside the measuring experiment.
GO_FIFO_NAME = ".llem-go.fifo"
#: Where the experiment (the helper, or any program) appends its timing marks.
MARKS_FILENAME = ".llem-marks.jsonl"
#: Written by the host once the run's neighbours are quiet (paused, or the policy lets
#: them run): the experiment, having marked `quiet`, waits for it before it measures.
QUIET_FILENAME = ".llem-quiet"
#: The most of the marks file the host reads (a few lines are expected).
MAX_MARKS_BYTES = 64 * 1024
DEFAULT_MAX_RESULT_BYTES = 64 * 1024 * 1024
ERROR_KEYS = frozenset({"type", "message", "traceback", "config_hash"})

log = structlog.get_logger("llem_dispatch.exchange")


@dataclass(frozen=True, slots=True)
class ReadOutcome:
    """What the experiment left behind: a result, an error payload, or neither."""

    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    #: The file the result was read from (not always `{hash}_result.json`: see read_outcome).
    result_file: str | None = None


def is_error_payload(data: object) -> bool:
    """True for `{"type", "message", "traceback"?}`: the protocol's error shape."""
    return (
        isinstance(data, dict)
        and {"type", "message"} <= data.keys()
        and data.keys() <= ERROR_KEYS
        and isinstance(data.get("type"), str)
    )


class _NonFiniteNumberError(ValueError):
    """A NaN or Infinity in a result file."""


def _no_constants(name: str) -> Any:
    raise _NonFiniteNumberError(name)


class ExchangeDir:
    """One experiment's exchange directory on the host (mode 0700)."""

    def __init__(self, path: Path, config_hash: str) -> None:
        self.path = path
        self.config_hash = config_hash
        #: Held at a gate (prestart): `env` names the go file, `open_gate` writes it.
        self.gated = False
        #: The host follows its marks and grants its quiet window (`grant_quiet`): only
        #: then is the experiment told to ask for one (it would wait in vain otherwise).
        self.grants_quiet = False
        #: The write end of the gate's FIFO, held open from the gate's opening to `close_gate`.
        self._gate_fd: int | None = None

    @classmethod
    def create(cls, config_hash: str, *, base_dir: str | Path | None = None) -> ExchangeDir:
        """Make a fresh `llem-*` dir (mkdtemp: 0700, owned by us)."""
        path = Path(tempfile.mkdtemp(prefix="llem-", dir=base_dir))
        return cls(path, config_hash)

    @property
    def config_name(self) -> str:
        return f"{self.config_hash}_config.json"

    @property
    def result_name(self) -> str:
        return f"{self.config_hash}_result.json"

    @property
    def error_name(self) -> str:
        return f"{self.config_hash}_error.json"

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILENAME

    @property
    def secrets_path(self) -> Path:
        return self.path / SECRETS_FILENAME

    def env(self, root: str) -> dict[str, str]:
        """The protocol's environment, with paths as seen from `root` (container or host)."""
        env = {
            "LLEM_CONFIG_PATH": f"{root}/{self.config_name}",
            "LLEM_RESULT_PATH": f"{root}/{self.result_name}",
            "LLEM_ERROR_PATH": f"{root}/{self.error_name}",
            "LLEM_EXCHANGE_DIR": root,
            "LLEM_CONFIG_HASH": self.config_hash,
            "LLEM_MARKS_PATH": f"{root}/{MARKS_FILENAME}",
        }
        if self.grants_quiet:
            env["LLEM_QUIET_PATH"] = f"{root}/{QUIET_FILENAME}"
        if self.secrets_path.exists():
            env["LLEM_SECRETS_PATH"] = f"{root}/{SECRETS_FILENAME}"
        if self.gated:
            env["LLEM_GO_PATH"] = f"{root}/{GO_FILENAME}"
            if (self.path / GO_FIFO_NAME).exists():
                env["LLEM_GO_FIFO"] = f"{root}/{GO_FIFO_NAME}"
        return env

    def hold_at_gate(self) -> None:
        """Mark the run as held at a gate, with a FIFO its gate may block on (no polling).

        Without FIFOs (not POSIX) the gate polls the go file alone.
        """
        self.gated = True
        with contextlib.suppress(OSError, AttributeError):
            os.mkfifo(self.path / GO_FIFO_NAME, 0o644)
            os.chmod(self.path / GO_FIFO_NAME, 0o644)  # past the umask, as the go file

    def open_gate(self) -> None:
        """Write the go file, then wake a gate blocked on the FIFO: the GPUs are its now.

        The FIFO's write end stays open (read-write, so opening never blocks and the
        line stays buffered) until `close_gate`: a gate that opens the FIFO only now
        still finds the line, never an end of file or a reader with no writer.
        """
        (self.path / GO_FILENAME).touch(mode=0o644)
        fifo = self.path / GO_FIFO_NAME
        if self._gate_fd is not None or not fifo.exists():
            return
        try:
            self._gate_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW)
            os.write(self._gate_fd, b"go\n")
        except OSError as exc:  # the go file alone still opens the gate (by polling)
            log.warning("gate_fifo_failed", exchange_dir=str(self.path), error=str(exc))

    def grant_quiet(self) -> None:
        """Tell the experiment its measured window may open (its neighbours are quiet)."""
        (self.path / QUIET_FILENAME).touch(mode=0o644)

    def close_gate(self) -> None:
        """Close the FIFO's write end (after the run); idempotent."""
        fd, self._gate_fd = self._gate_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def read_marks(self) -> dict[str, dict[str, Any]]:
        """The experiment's timing marks, first of each name: `{name: {"t": s, ...}}`.

        Best effort and never raises: marks are timing, not results; a malformed
        line is skipped, a link or an oversized file reads as no marks.
        """
        try:
            raw = self._read_bounded(MARKS_FILENAME, MAX_MARKS_BYTES)
        except ResultError:
            return {}
        marks: dict[str, dict[str, Any]] = {}
        for line in (raw or b"").decode("utf-8", "replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("mark"), str):
                continue
            t = entry.get("t")
            if isinstance(t, int | float) and not isinstance(t, bool):
                marks.setdefault(entry["mark"], {**entry, "t": float(t)})
        return marks

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write the config as canonical JSON."""
        target = self.path / self.config_name
        atomic_write(target, canonical_json(config).encode("utf-8"), mode=0o644)
        return target

    def write_secrets(self, secrets: Mapping[str, str]) -> None:
        """Write secrets as a 0600 file: never passed as container Env."""
        if secrets:
            atomic_write(self.secrets_path, json.dumps(dict(secrets)).encode(), mode=0o600)

    def remove_secrets(self) -> None:
        """Delete the secrets file; called after every run, success or not."""
        with contextlib.suppress(FileNotFoundError):
            self.secrets_path.unlink()

    def chown(self, uid: int, gid: int) -> None:
        """Hand the dir to the container's user (only possible, and only needed, as root)."""
        for entry in (self.path, *self.path.iterdir()):
            if entry.name != SECRETS_FILENAME:
                os.chown(entry, uid, gid, follow_symlinks=False)
        if self.secrets_path.exists():
            os.chown(self.secrets_path, uid, gid, follow_symlinks=False)

    def read_outcome(self, *, max_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> ReadOutcome:
        """Read the error payload if present, else the result; both are optional here."""
        error = self._read_json(self.error_name, max_bytes)
        if error is not None:
            if not is_error_payload(error):
                error = {"type": "MalformedErrorPayload", "message": repr(error)[:2000]}
            return ReadOutcome(error=error)
        name = self._result_file()
        result = self._read_json(name, max_bytes) if name is not None else None
        if result is None:
            return ReadOutcome()
        if is_error_payload(result):
            return ReadOutcome(error=result)
        if not isinstance(result, dict):
            raise ResultError(
                f"result file {self.result_name} holds a JSON {type(result).__name__}, "
                "not an object",
                fix_suggestion="Write one JSON object ({...}) to $LLEM_RESULT_PATH.",
                config_hash=self.config_hash,
                exchange_dir=self.path,
            )
        return ReadOutcome(result=result, result_file=name)

    def _result_file(self) -> str | None:
        """`{hash}_result.json`, else the one `*_result.json` there is, else None.

        Images that name the result by their own hash (llenergymeasure's entrypoint
        hashes its config with its defaults filled in) still work unchanged; two
        candidates are ambiguous and refused by name.
        """
        if os.path.lexists(self.path / self.result_name):
            return self.result_name
        found = sorted(p.name for p in self.path.glob("*_result.json"))
        if len(found) > 1:
            raise ResultError(
                f"no {self.result_name}, and {len(found)} other result files: "
                f"{', '.join(found)}; cannot tell which is this experiment's",
                fix_suggestion="Write exactly one result, to $LLEM_RESULT_PATH.",
                config_hash=self.config_hash,
                exchange_dir=self.path,
            )
        return found[0] if found else None

    def _read_json(self, name: str, max_bytes: int) -> Any:
        """Parse `name` inside the dir (None when absent): JSON only, bounded, no links."""
        raw = self._read_bounded(name, max_bytes)
        if raw is None:
            return None
        return self._parse(name, raw)

    def _read_bounded(self, name: str, max_bytes: int) -> bytes | None:
        """Read `name` inside the dir; never follow a link, never read unbounded."""
        path = self.path / name
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ResultError(
                    f"{name} is a symbolic link; the host never follows links out of the "
                    "exchange dir",
                    fix_suggestion="Write the result as a regular file, not a link.",
                    config_hash=self.config_hash,
                    exchange_dir=self.path,
                ) from exc
            raise ResultError(
                f"cannot open {name}: {exc.strerror}",
                config_hash=self.config_hash,
                exchange_dir=self.path,
            ) from exc
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ResultError(
                    f"{name} is not a regular file",
                    fix_suggestion="Write the result as a regular file.",
                    config_hash=self.config_hash,
                    exchange_dir=self.path,
                )
            if info.st_size > max_bytes:
                raise ResultError(
                    f"{name} is {info.st_size} bytes, over the {max_bytes}-byte cap",
                    fix_suggestion="Keep bulky outputs out of the result JSON (write them "
                    "to files), or raise max_result_bytes.",
                    config_hash=self.config_hash,
                    exchange_dir=self.path,
                )
            raw = handle.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise ResultError(
                f"{name} grew past the {max_bytes}-byte cap while being read",
                config_hash=self.config_hash,
                exchange_dir=self.path,
            )
        return raw

    def _parse(self, name: str, raw: bytes) -> Any:
        try:
            return json.loads(raw, parse_constant=_no_constants)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ResultError(
                f"{name} is not valid JSON ({exc}); it may be truncated or half-written",
                config_hash=self.config_hash,
                exchange_dir=self.path,
            ) from exc
        except _NonFiniteNumberError as exc:
            raise ResultError(
                f"{name} holds {exc.args[0]}, which JSON does not allow (it would be stored "
                "as null without a word)",
                fix_suggestion="Write null, or the value as a string, where a number is "
                "NaN or infinite (json.dumps(..., allow_nan=False) catches it).",
                config_hash=self.config_hash,
                exchange_dir=self.path,
            ) from None
        except RecursionError:
            raise ResultError(
                f"{name} is nested too deeply to read",
                fix_suggestion="Flatten the result: a result needs only a few levels.",
                config_hash=self.config_hash,
                exchange_dir=self.path,
            ) from None

    def remove(self) -> None:
        """Delete the dir; a failure is a warning and never masks the run's outcome."""
        try:
            remove_tree(self.path)
        except FileNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong here, the outcome stands
            log.warning("exchange_dir_cleanup_failed", exchange_dir=str(self.path), error=str(exc))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


def remove_tree(path: Path) -> None:
    """`shutil.rmtree`, also when the experiment left dirs we may not read or write.

    Root passes permission checks anyway. Any other user, on a permission error,
    gives itself back rwx on the dirs it owns (a container run as that user may
    have chmod-ed them to 000) and tries once more.
    """
    try:
        shutil.rmtree(path)
    except PermissionError:
        _restore_owner_access(path)
        shutil.rmtree(path)


def _restore_owner_access(top: Path) -> None:
    """chmod u+rwx every dir under `top` that we own (root: all), top-down, never via a link."""
    uid = os.geteuid()
    pending = [str(top)]
    while pending:
        directory = pending.pop()
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or uid not in {0, info.st_uid}:
            continue
        if info.st_mode & stat.S_IRWXU != stat.S_IRWXU:
            os.chmod(directory, stat.S_IMODE(info.st_mode) | stat.S_IRWXU)
        with os.scandir(directory) as entries:
            pending.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))


def atomic_write(target: Path, data: bytes, *, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_secrets(root: Path) -> list[Path]:
    """Delete secrets files left in the exchange dirs under `root` (a crash kept them).

    Call only when no run of `root` is alive (its results dir lock is held).
    Returns what was removed; links are removed, never followed.
    """
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in root.glob(f"*/{SECRETS_FILENAME}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
