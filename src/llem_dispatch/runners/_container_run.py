"""One container's run: the `RunBackend` that the shared lifecycle drives for DockerRunner.

Create, attach, start, wait (with liveness inspects), kill, stop, inspect the exit,
remove: each Engine API call under its own deadline, its errors translated once.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import os
import secrets as _secrets_mod
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiodocker
import aiohttp
import anyio
import structlog

from llem_dispatch._docker import bounded, translate_api_error
from llem_dispatch._engine import ContainerEngine
from llem_dispatch._exchange import CONTAINER_EXCHANGE_DIR, ExchangeDir
from llem_dispatch._logcapture import LogCapture
from llem_dispatch.errors import (
    DockerContainerError,
    DockerDaemonHungError,
    DockerError,
    DockerHangError,
    DockerOOMError,
    DockerTimeoutError,
    LlemError,
)
from llem_dispatch.runners._backend import ErrorClasses, ExitStatus, Pump, Run
from llem_dispatch.runners._cancel import FORCE_KILL, wait_until_forced
from llem_dispatch.runners.protocol import CpuPlacement

if TYPE_CHECKING:
    from llem_dispatch.runners.docker import DockerRunner

__all__ = ["DOCKER_ERRORS", "ContainerRun", "cpu_update", "engine_errors"]

log = structlog.get_logger("llem_dispatch.docker")

#: What a container run raises for what the shared lifecycle detects: the Docker
#: classes (llenergymeasure's contract), each a subclass of its neutral class.
DOCKER_ERRORS = ErrorClasses(
    timeout=DockerTimeoutError,
    hang=DockerHangError,
    oom=DockerOOMError,
    bad_exit=DockerContainerError,
    other=DockerError,
    slow_start=" (the Docker daemon is slow or stuck)",
)


def engine_errors(engine: ContainerEngine) -> ErrorClasses:
    """`DOCKER_ERRORS` as a run on `engine` raises them: that engine's own subclasses
    (`PodmanTimeoutError` on Podman), naming it and its URL when a start is slow."""
    return ErrorClasses(
        timeout=DockerTimeoutError.for_engine(engine.name),
        hang=DockerHangError.for_engine(engine.name),
        oom=DockerOOMError.for_engine(engine.name),
        bad_exit=DockerContainerError.for_engine(engine.name),
        other=DockerError.for_engine(engine.name),
        slow_start=f" ({engine} is slow or stuck)",
    )


#: A preparing container's CPU weight (cgroup `cpu.shares`; the default is 1024).
LOW_CPU_SHARES = 2
#: How long one pause, unpause or update call may take (seconds).
CONTROL_DEADLINE_S = 10.0


def cpu_update(placement: CpuPlacement) -> dict[str, Any]:
    """The HostConfig fields (create) or update body that put a container on `placement`."""
    body: dict[str, Any] = {"CpuShares": LOW_CPU_SHARES if placement.low_priority else 1024}
    if placement.cpus:
        body["CpusetCpus"] = ",".join(str(c) for c in placement.cpus)
    return body


class ContainerRun:
    """One run's container: the `RunBackend` that `run_lifecycle` drives for DockerRunner."""

    noun = "container"

    def __init__(self, runner: DockerRunner) -> None:
        self.runner = runner
        self.engine = runner.engine
        self.errors = engine_errors(self.engine)
        self.log = log.bind(image=runner.image, engine=str(self.engine))
        self.image_digest: str | None = None
        self.container: Any = None
        self.stream: Any = None

    def exchange_root(self, exchange: ExchangeDir) -> str:
        return CONTAINER_EXCHANGE_DIR

    async def prepare(self) -> None:
        if self.runner.pending_removal:
            await self.runner.remove_pending()
        self.image_digest = await self.runner.image_digest()

    async def start(self, run: Run) -> None:
        """Create, attach, start; every Docker error translated with the run's context."""
        runner, exchange = self.runner, run.exchange
        run.info.engine = str(self.engine)
        if runner.user is not None and os.geteuid() == 0:
            uid, _, gid = runner.user.partition(":")
            if uid.isdigit():
                exchange.chown(int(uid), int(gid) if gid.isdigit() else int(uid))
        mode = await runner.gpu_mode_for(run.info.gpu_ids)
        run.info.gpu_request = mode if run.info.gpu_ids else None
        spec = runner.container_spec(
            exchange,
            run.info.gpu_ids,
            config_hash=exchange.config_hash,
            gpu_request=mode,
            cpu=run.cpu,
        )
        name = f"llem-{exchange.config_hash}-{_secrets_mod.token_hex(3)}"

        async def create() -> Any:
            return await runner.client().containers.create(spec, name=name)

        # Shielded: a create cancelled mid-request can still make a container whose
        # id we would never learn. Let it finish (bounded), then clean up; one that
        # hangs is removed by name later, if the daemon ever makes it.
        try:
            with anyio.CancelScope(shield=True):
                self.container = await self._call("create", run, create)
        except DockerDaemonHungError:
            runner.pending_removal.add(name)
            raise
        run.info.container_id = self.container.id
        run.context["container_id"] = self.container.id
        run.bind(container_id=self.container.id[:12])
        # Attach before start: the raw stdio stream misses nothing (the logs endpoint
        # with follow=True drops a last line without newline) and, with the "none" log
        # driver, costs the daemon no JSON encoding per line.
        self.stream = await self._call("attach", run, self._attach)
        await self._call("start", run, self.container.start)

    async def _attach(self) -> Any:
        stream = self.container.attach(stdout=True, stderr=True)
        await stream.__aenter__()
        return stream

    async def _call(self, phase: str, run: Run, call: Callable[[], Awaitable[Any]]) -> Any:
        """One API call of this run, under its deadline (`DockerDaemonHungError` past it)."""
        return await bounded(
            phase,
            self.runner.deadlines.of(phase),
            call,
            image=self.runner.image,
            engine=self.engine,
            **run.context,
        )

    def pumps(self, capture: LogCapture) -> Sequence[Pump]:
        return [lambda: _pump(self.stream, capture)]

    async def wait(self, run: Run) -> None:
        """Until the container exits; a bounded inspect every `liveness_every` s meanwhile.

        The wait itself may last as long as the experiment: a daemon that hangs
        meanwhile is caught by the inspects, which then pass their deadline. Errors
        leave the task group unwrapped, as the `LlemError` they are.
        """
        errors: list[LlemError] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._prove_alive, run, errors, tg.cancel_scope)
            try:
                await self.container.wait()
            except Exception as exc:  # noqa: BLE001 - translated, then raised below
                errors.append(
                    translate_api_error(
                        exc,
                        image=self.runner.image,
                        phase="wait",
                        engine=self.engine,
                        **run.context,
                    )
                )
            tg.cancel_scope.cancel()
        if errors:
            raise errors[0]

    async def _prove_alive(
        self, run: Run, errors: list[LlemError], scope: anyio.CancelScope
    ) -> None:
        try:
            while True:
                await anyio.sleep(self.runner.deadlines.liveness_every)
                await self._call("inspect", run, self.container.show)
        except LlemError as exc:
            errors.append(exc)
            scope.cancel()

    async def kill(self, run: Run) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.runner.deadlines.kill):
            try:
                await self.container.kill(signal="SIGKILL")
                return
            except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
                run.bound.debug("kill_failed", error=repr(exc))
                return
        run.bound.warning("kill_timed_out", deadline_s=self.runner.deadlines.kill)

    async def pause(self, run: Run) -> bool:
        """The engine's pause (the cgroup freezer); False when it could not."""
        return await self._control(run, "pause", self.container.pause)

    async def resume(self, run: Run) -> None:
        """The engine's unpause."""
        await self._control(run, "unpause", self.container.unpause)

    async def place(self, run: Run, placement: CpuPlacement) -> None:
        """Its cpuset and CPU weight, updated in place (`docker update`)."""
        body = cpu_update(placement)

        async def update() -> None:
            path = f"containers/{self.container.id}/update"
            data = json.dumps(body)
            async with self.container.docker._query(path, method="POST", data=data):
                pass

        await self._control(run, "update", update)

    async def _control(self, run: Run, what: str, call: Callable[[], Awaitable[Any]]) -> bool:
        """One pause/unpause/update call, bounded; a failure is a warning, never raised."""
        if self.container is None:
            return False
        with anyio.move_on_after(CONTROL_DEADLINE_S) as scope:
            try:
                await call()
            except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
                run.bound.warning(f"container_{what}_failed", error=repr(exc))
                return False
        if scope.cancelled_caught:
            run.bound.warning(f"container_{what}_timed_out", deadline_s=CONTROL_DEADLINE_S)
            return False
        return True

    async def exited(self, run: Run) -> ExitStatus:
        state = (await self._call("inspect", run, self.container.show))["State"]
        code = int(state.get("ExitCode", -1))
        oom_killed = bool(state.get("OOMKilled"))
        oom = None
        if oom_killed or code == 137:
            oom = "container was killed by the OOM killer" + (
                " (State.OOMKilled)" if oom_killed else " (exit 137, not by us)"
            )
        return ExitStatus(code=code, oom=oom, log_fields={"oom_killed": oom_killed})

    async def stop(self, run: Run) -> None:
        """SIGTERM, SIGKILL after the grace period (at once if forced)."""
        if self.container is None:
            return
        grace = 0 if FORCE_KILL.is_set() else self.runner.stop_grace_s
        limit = min(anyio.current_time() + grace + self.runner.deadlines.stop, run.cleanup_deadline)
        with anyio.CancelScope(shield=True, deadline=limit):
            try:
                if grace > 0:
                    run.bound.info("container_stopping", grace_s=grace)
                    # Docker sends SIGTERM, then SIGKILL once `t` seconds have passed.
                    with anyio.move_on_after(grace + 5):
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._kill_when_forced, tg.cancel_scope)
                            await self.container.stop(t=math.ceil(grace))
                            tg.cancel_scope.cancel()
                else:
                    await self.container.kill(signal="SIGKILL")
            except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
                run.bound.debug("stop_failed", error=repr(exc))

    async def _kill_when_forced(self, scope: anyio.CancelScope) -> None:
        await wait_until_forced()
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError):
            await self.container.kill(signal="SIGKILL")
        scope.cancel()

    async def cleanup(self, run: Run) -> None:
        """Close the attached stream, then force-remove the container."""
        if self.stream is not None:
            limit = min(anyio.current_time() + 5, run.cleanup_deadline)
            with anyio.CancelScope(shield=True, deadline=limit), contextlib.suppress(Exception):
                await self.stream.close()
        if self.container is not None:
            await self.runner.remove_container(self.container, run.bound, by=run.cleanup_deadline)


async def _pump(stream: Any, capture: LogCapture) -> None:
    """Copy the attached stdout/stderr frames into the capture until EOF."""
    decoders = {
        1: codecs.getincrementaldecoder("utf-8")(errors="replace"),
        2: codecs.getincrementaldecoder("utf-8")(errors="replace"),
    }
    try:
        while True:
            message = await stream.read_out()
            if message is None:
                break
            fileno = 2 if message.stream == 2 else 1
            capture.feed(
                "stderr" if fileno == 2 else "stdout", decoders[fileno].decode(message.data)
            )
    except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
        log.debug("attach_stream_ended", error=repr(exc))
