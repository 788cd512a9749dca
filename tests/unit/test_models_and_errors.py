"""Pure logic: config hash, error classification, exchange-dir reading, public surface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

import llem_dispatch
from llem_dispatch import (
    ConfigError,
    DockerContainerError,
    DockerGPUAccessError,
    DockerImagePullError,
    DockerOOMError,
    DockerPermissionError,
    DockerTimeoutError,
    DockerUnavailableError,
    ResultError,
    capture_stderr_snippet,
    compute_config_hash,
    translate_docker_error,
)
from llem_dispatch import _exchange as _exchange_module
from llem_dispatch._exchange import ExchangeDir


def test_public_all_is_sorted_and_importable() -> None:
    names = llem_dispatch.__all__
    assert names == sorted(names)
    for name in names:
        assert getattr(llem_dispatch, name) is not None


def test_hash_is_16_hex_and_order_independent() -> None:
    a = compute_config_hash({"b": 1, "a": {"y": [1, 2], "x": "s"}})
    b = compute_config_hash({"a": {"x": "s", "y": [1, 2]}, "b": 1})
    assert a == b
    assert len(a) == 16
    int(a, 16)
    assert compute_config_hash({"b": 2}) != compute_config_hash({"b": 1})


def test_hash_known_value_matches_protocol() -> None:
    # SHA-256 of '{"a":1,"b":[true,null]}' (canonical JSON), first 16 hex chars.
    import hashlib

    expected = hashlib.sha256(b'{"a":1,"b":[true,null]}').hexdigest()[:16]
    assert compute_config_hash({"b": [True, None], "a": 1}) == expected


def test_hash_is_stable_across_processes() -> None:
    code = "from llem_dispatch import compute_config_hash as h; print(h({'m': 'x', 'bs': 8}))"
    out = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout.strip()
        for seed in (1, 2, 3)
    }
    assert out == {compute_config_hash({"bs": 8, "m": "x"})}


def test_hash_accepts_pydantic_models() -> None:
    class Cfg(BaseModel):
        model: str
        batch_size: int

    assert compute_config_hash(Cfg(model="m", batch_size=2)) == compute_config_hash(
        {"batch_size": 2, "model": "m"}
    )


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"a": {1, 2}}, "a"),
        ({"a": {"b": [1, object()]}}, "a.b[1]"),
        ({"a": float("nan")}, "a"),
        ({"a": {3: "x"}}, "3"),
    ],
)
def test_non_json_config_names_the_field(config: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        compute_config_hash(config)
    assert field in info.value.message


def test_capture_stderr_snippet_keeps_last_lines() -> None:
    text = "\n".join(f"l{i}" for i in range(50)) + "\n\n"
    assert capture_stderr_snippet(text).splitlines() == [f"l{i}" for i in range(30, 50)]
    assert capture_stderr_snippet(text, max_lines=2) == "l48\nl49"
    assert capture_stderr_snippet(b"a\nb") == "a\nb"


@pytest.mark.parametrize(
    ("code", "stderr", "cls"),
    [
        (
            125,
            'could not select device driver "nvidia" with capabilities: [[gpu]]',
            DockerGPUAccessError,
        ),
        (125, "Unable to find image 'x:1' locally\npull access denied", DockerImagePullError),
        (1, "permission denied while trying to connect to the docker.sock", DockerPermissionError),
        (
            1,
            "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the docker "
            "daemon running?",
            DockerUnavailableError,
        ),
        (137, "", DockerOOMError),
        (1, "torch.OutOfMemoryError: CUDA out of memory", DockerOOMError),
        (124, "", DockerTimeoutError),
        (2, "Traceback ...\nValueError: x", DockerContainerError),
    ],
)
def test_translate_docker_error_table(code: int, stderr: str, cls: type[Exception]) -> None:
    err = translate_docker_error(code, stderr, "img:1")
    assert type(err) is cls
    assert err.fix_suggestion
    assert err.exit_code == code


def test_image_error_fix_names_the_image() -> None:
    err = translate_docker_error(125, "No such image: img:1", "img:1")
    assert "docker build -t img:1" in err.fix_suggestion


def test_error_tree_and_transience() -> None:
    # An unreachable daemon is not a permission problem (their fixes differ).
    assert not issubclass(DockerUnavailableError, DockerPermissionError)
    assert not issubclass(DockerPermissionError, DockerUnavailableError)
    assert DockerUnavailableError("x").transient
    assert not DockerGPUAccessError("x").transient
    assert "Fix:" in str(DockerOOMError("x"))


def _exchange(tmp_path: Path) -> ExchangeDir:
    ex = ExchangeDir.create("abcd", base_dir=tmp_path)
    assert ex.path.name.startswith("llem-")
    assert (ex.path.stat().st_mode & 0o777) == 0o700
    return ex


def test_read_result_and_error_payload(tmp_path: Path) -> None:
    ex = _exchange(tmp_path)
    assert ex.read_outcome().result is None
    (ex.path / ex.result_name).write_text('{"x": 1}')
    assert ex.read_outcome().result == {"x": 1}
    (ex.path / ex.error_name).write_text('{"type": "E", "message": "m", "traceback": "t"}')
    assert ex.read_outcome().error == {"type": "E", "message": "m", "traceback": "t"}


def test_result_symlink_is_never_followed(tmp_path: Path) -> None:
    ex = _exchange(tmp_path)
    secret = tmp_path / "host-secret"
    secret.write_text('{"stolen": true}')
    (ex.path / ex.result_name).symlink_to(secret)
    with pytest.raises(ResultError, match="symbolic link"):
        ex.read_outcome()


def test_result_not_regular_file(tmp_path: Path) -> None:
    ex = _exchange(tmp_path)
    os.mkfifo(ex.path / ex.result_name)
    with pytest.raises(ResultError, match="not a regular file"):
        ex.read_outcome()


def test_result_size_cap_and_truncation(tmp_path: Path) -> None:
    ex = _exchange(tmp_path)
    (ex.path / ex.result_name).write_text(json.dumps({"x": "y" * 100}))
    with pytest.raises(ResultError, match="over the 50-byte cap"):
        ex.read_outcome(max_bytes=50)
    (ex.path / ex.result_name).write_text('{"x": [1, 2')
    with pytest.raises(ResultError, match="truncated"):
        ex.read_outcome()


def test_secrets_file_is_0600_and_removable(tmp_path: Path) -> None:
    ex = _exchange(tmp_path)
    ex.write_secrets({"HF_TOKEN": "hf_x"})
    assert (ex.secrets_path.stat().st_mode & 0o777) == 0o600
    assert "LLEM_SECRETS_PATH" in ex.env("/run/llem")
    ex.remove_secrets()
    assert not ex.secrets_path.exists()


def _exchange_left_locked(base: Path) -> ExchangeDir:
    """An exchange dir as a container may leave it: a result, dirs chmod-ed 000 and 500."""
    ex = ExchangeDir.create("abcd", base_dir=base)
    (ex.path / ex.result_name).write_text("{}")
    locked = ex.path / "x"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "f").write_text("1")
    (locked / "inner").chmod(0)
    locked.chmod(0)
    readonly = ex.path / "ro"
    readonly.mkdir()
    (readonly / "g").write_text("2")
    readonly.chmod(0o500)
    return ex


def _removed_without_warning(base: Path) -> bool:
    ex = _exchange_left_locked(base)
    with capture_logs() as logs:
        ex.remove()
    return not ex.path.exists() and logs == []


def test_remove_deletes_dirs_left_unreadable(tmp_path: Path) -> None:
    assert _removed_without_warning(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="the test above already runs as a non-root user")
def test_remove_deletes_dirs_left_unreadable_as_non_root() -> None:
    # Root passes every permission check: a forked child that drops to nobody
    # meets the ones a non-root dispatcher does (a re-exec could not reach
    # this interpreter under /root).
    with tempfile.TemporaryDirectory(prefix="llem-test-") as base:
        os.chown(base, 65534, 65534)
        with warnings.catch_warnings():
            # 3.12+ warns about forking a threaded process; the child only touches files.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                code = 0 if _removed_without_warning(Path(base)) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_remove_failure_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = _exchange(tmp_path)

    def broken(path: Path) -> None:
        raise TypeError("open() missing required argument 'flags'")

    monkeypatch.setattr(_exchange_module, "remove_tree", broken)
    with capture_logs() as logs:
        ex.remove()
    assert [e["event"] for e in logs] == ["exchange_dir_cleanup_failed"]
    assert logs[0]["log_level"] == "warning"


def test_container_helper_runs_function_and_reports_errors(tmp_path: Path) -> None:
    ex = _exchange(tmp_path)
    ex.write_config({"a": 1})
    env = {**os.environ, **ex.env(str(ex.path))}
    ok = subprocess.run(
        [sys.executable, "-m", "llem_dispatch.container", "builtins:dict"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads((ex.path / ex.result_name).read_text()) == {"a": 1}
    bad = subprocess.run(
        [sys.executable, "-m", "llem_dispatch.container", "builtins:int"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    payload = json.loads((ex.path / ex.error_name).read_text())
    assert payload["type"] == "TypeError"
    assert "Traceback" in payload["traceback"]
    usage = subprocess.run(
        [sys.executable, "-m", "llem_dispatch.container"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert usage.returncode == 2
