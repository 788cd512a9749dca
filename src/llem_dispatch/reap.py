"""Reaping: remove containers whose owning dispatcher is gone, keeping their logs.

A dispatcher killed with SIGKILL cannot clean up; its containers carry labels
naming their owner (host, pid + start time, session), so the next run or
`llem-dispatch reap` finds and removes them.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import anyio
import structlog

from llem_dispatch import _labels
from llem_dispatch._docker import DEFAULT_DEADLINES, ApiDeadlines, bounded, docker_url
from llem_dispatch._exchange import SECRETS_FILENAME
from llem_dispatch.errors import DockerDaemonHungError, LlemError

__all__ = ["ReapedContainer", "reap"]

log = structlog.get_logger("llem_dispatch.reap")


@dataclass(frozen=True, slots=True)
class ReapedContainer:
    """A container found without a living owner (removed unless dry_run)."""

    container_id: str
    name: str
    config_hash: str | None
    owner_pid: str | None
    results_dir: str | None
    log_path: str | None
    removed: bool


async def reap(
    *,
    results_dir: str | Path | None = None,
    logs_dir: str | Path | None = None,
    dry_run: bool = False,
    docker_host: str | None = None,
    study_over: bool = False,
    deadlines: ApiDeadlines = DEFAULT_DEADLINES,
) -> list[ReapedContainer]:
    """Remove llem-managed containers of this host whose owner process is gone.

    Logs of each are saved first: into its exchange dir when that still exists,
    else into `logs_dir`. Containers of other hosts and of live owners are never
    touched. `results_dir` limits the search to one study's containers.

    `study_over=True` (with `results_dir`) is the end-of-study sweep on a cluster
    node: the study has a final record for every experiment, so any container of
    it still here is abandoned, even if its owner lives on (a worker of a node
    that left the cluster keeps running its task).
    """
    if study_over and results_dir is None:
        raise ValueError("study_over=True needs results_dir: it must never sweep other studies")
    label_filters = [f"{_labels.LABEL_MANAGED}=1"]
    if results_dir is not None:
        label_filters.append(f"{_labels.LABEL_RESULTS_DIR}={Path(results_dir).resolve()}")
    found: list[ReapedContainer] = []
    docker = aiodocker.Docker(url=docker_host or docker_url())
    try:
        filters = json.dumps({"label": label_filters})
        containers = await bounded(
            "list", deadlines.list, lambda: docker.containers.list(all=True, filters=filters)
        )
        for container in containers:
            try:
                reaped = await _reap_one(
                    container, logs_dir, dry_run=dry_run, study_over=study_over, deadlines=deadlines
                )
            except LlemError as exc:
                # Gone since the listing, broken, or the daemon hangs on it: skip it
                # (bounded), never stop the whole reap.
                log.warning("reap_skipped", container_id=container.id[:12], error=exc.message)
                continue
            if reaped is not None:
                found.append(reaped)
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await docker.close()
    return found


async def _reap_one(
    container: aiodocker.containers.DockerContainer,
    logs_dir: str | Path | None,
    *,
    dry_run: bool,
    study_over: bool,
    deadlines: ApiDeadlines,
) -> ReapedContainer | None:
    """Logs kept, then removed, if its owner is gone; None when it is not ours to reap."""
    # The listing carries the labels: no inspect, which a stuck daemon may never answer.
    labels: dict[str, str] = dict(_listed(container, "Labels") or {})
    alive = _labels.owner_alive(labels)
    if alive is None or (alive and not study_over):
        return None
    short = container.id[:12]
    # Read before the delete: aiodocker drops the listing's fields once it is deleted.
    name = str((_listed(container, "Names") or [""])[0]).lstrip("/")
    log_path = await _save_logs(container, labels, logs_dir, deadlines.logs)
    if not dry_run:
        try:
            await bounded("delete", deadlines.delete, lambda: _delete(container))
        except DockerDaemonHungError:
            raise
        except LlemError as exc:
            log.warning("reap_remove_failed", container_id=short, error=exc.message)
            return None
        _remove_secrets(labels.get(_labels.LABEL_EXCHANGE_DIR))
    reaped = ReapedContainer(
        container_id=container.id,
        name=name,
        config_hash=labels.get(_labels.LABEL_CONFIG_HASH),
        owner_pid=labels.get(_labels.LABEL_PID),
        results_dir=labels.get(_labels.LABEL_RESULTS_DIR),
        log_path=log_path,
        removed=not dry_run,
    )
    log.warning(
        "orphan_reaped" if not dry_run else "orphan_found",
        container_id=short,
        config_hash=reaped.config_hash,
        owner_pid=reaped.owner_pid,
        log_path=log_path,
    )
    return reaped


def _listed(container: aiodocker.containers.DockerContainer, key: str) -> Any:
    """A field of the container as the listing gave it (None if absent)."""
    try:
        return container[key]
    except KeyError:
        return None


async def _delete(container: aiodocker.containers.DockerContainer) -> None:
    try:
        await container.delete(force=True, v=True)
    except aiodocker.DockerError as exc:
        if exc.status != 404:  # already gone is what we wanted
            raise


async def _save_logs(
    container: aiodocker.containers.DockerContainer,
    labels: dict[str, str],
    logs_dir: str | Path | None,
    deadline: float,
) -> str | None:
    exchange = labels.get(_labels.LABEL_EXCHANGE_DIR)
    target: Path | None = None
    if exchange and Path(exchange).is_dir():
        target = Path(exchange) / "container.orphan.log"
    elif logs_dir is not None:
        Path(logs_dir).mkdir(parents=True, exist_ok=True)
        target = Path(logs_dir) / f"{container.id[:12]}.log"
    if target is None:
        return None
    try:
        lines = await bounded("logs", deadline, lambda: container.log(stdout=True, stderr=True))
    except LlemError as exc:
        # The default "none" log driver keeps no logs in the daemon: the dispatcher
        # streamed them into the exchange dir's container.log as they came.
        captured = Path(exchange, "container.log") if exchange else None
        if captured is not None and captured.is_file() and not captured.is_symlink():
            return str(captured)
        log.warning("reap_logs_failed", container_id=container.id[:12], error=exc.message)
        return None
    # The exchange dir was writable by the container: never follow a link planted there.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("".join(lines))
    return str(target)


def _remove_secrets(exchange: str | None) -> None:
    """A reaped container's secrets file: no live container owns it any more."""
    if exchange:
        path = Path(exchange) / SECRETS_FILENAME
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            log.warning("stale_secrets_removed", path=str(path))
