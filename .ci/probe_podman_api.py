"""Which Docker Engine API calls that llem-dispatch makes work on an engine's socket.

Standalone probe (not a test): run against dockerd, Podman 5.4 and Podman 4.3, as root:

    /work/main/.venv/bin/python .ci/probe_podman_api.py \
        unix:///var/run/docker.sock unix:///run/llem-podman/podman.sock \
        unix:///run/llem-podman43/podman.sock

It creates containers with the body DockerRunner makes (runners/docker.py
`container_spec` / `_host_config`, with a CDI DeviceRequest for two of the made-up
GPUs of /etc/cdi/llem-test-gpu.yaml), drives them the way `_ContainerRun` does
(attach before start, start, wait, inspect, kill, stop, force delete) and prints, per
check, `works`, `FAILS: <error>` or `IGNORED: <what the container saw>`. Every
container it makes is removed at the end. Host paths are made under /tmp, which
setup-podman.sh shares with the Podman container at the same path.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiodocker

BUSYBOX = os.environ.get("LLEM_TEST_BUSYBOX_IMAGE", "llem-test/busybox:latest")
GPUS = [
    "GPU-5e1f0a00-0000-4000-8000-000000000000",
    "GPU-5e1f0a01-0000-4000-8000-000000000001",
    "GPU-5e1f0a02-0000-4000-8000-000000000002",
    "GPU-5e1f0a03-0000-4000-8000-000000000003",
]
PICK = [1, 3]  # the devices the probe asks for
MEM = 64 * 1024 * 1024
SHM = 32 * 1024 * 1024
LABELS = {"llem.managed": "1", "llem.probe": "podman-api"}
HELPER = "/opt/llem/llem_container.py"

SCRIPT = r"""
echo "uid=$(id -u):$(id -g)"
env | grep -E '^(LLEM_|NVIDIA_|CUDA_)' | sort
grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status
echo "shm_kb=$(df -k /dev/shm | tail -1 | awk '{print $2}')"
mp=$(grep ':memory:' /proc/self/cgroup | cut -d: -f3)
echo "memcg=$mp"
m=/sys/fs/cgroup/memory$mp; [ -e $m/memory.limit_in_bytes ] || m=/sys/fs/cgroup/memory
echo "mem=$(cat $m/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max)"
echo "memsw=$(cat $m/memory.memsw.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.swap.max)"
echo "net=$(ls /sys/class/net | tr '\n' ' ')"
echo "pid1=$(tr '\0' ' ' </proc/1/cmdline | cut -c1-6)"
echo "in=$(cat /run/llem/in.txt)"
echo written > /run/llem/out.txt && echo exchange-write-ok
(echo x > /opt/llem/llem_container.py) 2>/dev/null && echo helper-WRITABLE || echo helper-readonly
echo "helper=$(cat /opt/llem/llem_container.py)"
echo to-stderr >&2
printf last-no-newline
"""

results: list[tuple[str, str, str]] = []
FAILED: Any = object()  # what `guarded` returns when the call raised


def record(name: str, verdict: str, detail: str = "") -> None:
    results.append((name, verdict, detail))
    print(f"  {name:<34} {verdict:<8} {detail}", flush=True)


def err(exc: BaseException) -> str:
    if isinstance(exc, aiodocker.DockerError):
        return f"DockerError {exc.status}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


async def guarded(name: str, call: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await asyncio.wait_for(call(), 60)
    except Exception as exc:  # noqa: BLE001 - a probe reports every failure
        record(name, "FAILS", err(exc))
        return FAILED


def spec(cmd: list[str], exchange: str, helper: str, **host: Any) -> dict[str, Any]:
    """DockerRunner's create body (container_spec + _host_config)."""
    ids = [GPUS[i] for i in PICK]
    env = {
        "LLEM_EXCHANGE_DIR": "/run/llem",
        "LLEM_GPU_IDS": ",".join(ids),
        "NVIDIA_VISIBLE_DEVICES": ",".join(ids),
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(len(ids))),
    }
    host_config: dict[str, Any] = {
        "Mounts": [
            {"Type": "bind", "Source": exchange, "Target": "/run/llem", "ReadOnly": False},
            {"Type": "bind", "Source": helper, "Target": HELPER, "ReadOnly": True},
        ],
        "ShmSize": SHM,
        "SecurityOpt": ["no-new-privileges"],
        "CapDrop": ["ALL"],
        "CapAdd": ["SYS_NICE"],
        "Init": False,
        "LogConfig": {"Type": "none", "Config": {}},
        "NetworkMode": "none",
        "Memory": MEM,
        "MemorySwap": MEM,
        "DeviceRequests": [{"Driver": "cdi", "DeviceIDs": [f"llem.test/gpu={u}" for u in ids]}],
    }
    host_config.update(host)
    for key in [k for k, v in host_config.items() if v is None]:
        del host_config[key]
    return {
        "Image": BUSYBOX,
        "Env": [f"{k}={v}" for k, v in sorted(env.items())],
        "Labels": LABELS,
        "HostConfig": host_config,
        "AttachStdout": False,
        "AttachStderr": False,
        "Tty": False,
        "Cmd": cmd,
        "User": "65534:65534",
    }


async def read_all(stream: Any) -> tuple[str, str]:
    out, errs = [], []
    while True:
        msg = await stream.read_out()
        if msg is None:
            break
        (errs if msg.stream == 2 else out).append(msg.data.decode(errors="replace"))
    return "".join(out), "".join(errs)


async def probe(url: str) -> None:
    print(f"\n== {url}", flush=True)
    docker = aiodocker.Docker(url=url)
    made: list[Any] = []
    tmp = tempfile.mkdtemp(prefix="llem-probe-", dir="/tmp")
    try:
        await _probe(docker, made, tmp)
    finally:
        for c in made:
            try:
                await asyncio.wait_for(c.delete(force=True, v=True), 30)
            except Exception as exc:  # noqa: BLE001
                if not (isinstance(exc, aiodocker.DockerError) and exc.status == 404):
                    print(f"  cleanup of {c.id[:12]}: {err(exc)}")
        await docker.close()
        shutil.rmtree(tmp, ignore_errors=True)


def new_exchange(tmp: str, name: str) -> tuple[str, str]:
    exchange = os.path.join(tmp, name)
    os.mkdir(exchange, 0o700)
    with open(os.path.join(exchange, "in.txt"), "w") as f:
        f.write("input-from-host")
    os.chown(exchange, 65534, 65534)
    helper = os.path.join(tmp, f"{name}-helper.py")
    with open(helper, "w") as f:
        f.write("print('helper')")
    os.chmod(helper, 0o644)
    return exchange, helper


async def _probe(docker: aiodocker.Docker, made: list[Any], tmp: str) -> None:
    v = await guarded("version", docker.version)
    if v is not FAILED:
        comps = [f"{c.get('Name')} {c.get('Version')}" for c in v.get("Components") or []]
        record(
            "version",
            "works",
            f"Version={v.get('Version')} ApiVersion={v.get('ApiVersion')} "
            f"MinAPIVersion={v.get('MinAPIVersion')} Components=[{'; '.join(comps)}]",
        )
    info = await guarded("info", docker.system.info)
    if info is not FAILED:
        record(
            "info.CDISpecDirs",
            "works" if "CDISpecDirs" in info else "ABSENT",
            f"CDISpecDirs={info.get('CDISpecDirs')!r} OSType={info.get('OSType')} "
            f"CgroupVersion={info.get('CgroupVersion')} Driver={info.get('Driver')}",
        )
    img = await guarded("image inspect", lambda: docker.images.inspect(BUSYBOX))
    if img is not FAILED:
        record(
            "image inspect",
            "works",
            f"RepoDigests={img.get('RepoDigests')} Id={img.get('Id')} "
            f"RepoTags={img.get('RepoTags')}",
        )

    # -- the full DockerRunner body, attach before start, wait, inspect ----------------------
    exchange, helper = new_exchange(tmp, "main")
    c = await guarded(
        "create (full body)",
        lambda: docker.containers.create(spec(["sh", "-c", SCRIPT], exchange, helper), name=None),
    )
    if c is FAILED:
        return
    made.append(c)
    record("create (full body)", "works", c.id[:12])
    stream = c.attach(stdout=True, stderr=True)
    try:
        await asyncio.wait_for(stream.__aenter__(), 30)
        record("attach before start", "works")
    except Exception as exc:  # noqa: BLE001
        record("attach before start", "FAILS", err(exc))
        stream = None
    reader = asyncio.ensure_future(read_all(stream)) if stream is not None else None
    if await guarded("start", c.start) is not FAILED:
        record("start", "works")
    t0 = time.monotonic()
    w = await guarded("wait", c.wait)
    if w is not FAILED:
        record("wait", "works", f"{w} after {time.monotonic() - t0:.2f}s")
    out, errs = ("", "")
    if reader is not None:
        try:
            out, errs = await asyncio.wait_for(reader, 30)
            record("attach stream to EOF", "works", f"{len(out)} B stdout, {len(errs)} B stderr")
        except Exception as exc:  # noqa: BLE001
            record("attach stream to EOF", "FAILS", err(exc))
        await stream.close()
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    print("    --- container stdout ---\n    " + out.replace("\n", "\n    "))
    print(f"    --- container stderr --- {errs!r}")
    record(
        "stdout/stderr split",
        "works" if errs == "to-stderr\n" and "to-stderr" not in out.splitlines() else "WRONG",
        f"stderr={errs!r}",
    )
    record(
        "last line w/o newline",
        "works" if out.endswith("last-no-newline") else "LOST",
        repr(out[-20:]),
    )
    want = {f"LLEM_CDI_GPU_{i}": GPUS[i] for i in PICK}
    got = {k: v for k, v in lines.items() if k.startswith("LLEM_CDI_GPU_")}
    record(
        "DeviceRequests cdi",
        "works" if got == want else ("IGNORED" if not got else "WRONG"),
        f"container saw {got or 'no LLEM_CDI_GPU_* env'}",
    )
    record(
        "Env",
        "works" if lines.get("LLEM_GPU_IDS") == ",".join(GPUS[i] for i in PICK) else "WRONG",
        f"CUDA_VISIBLE_DEVICES={lines.get('CUDA_VISIBLE_DEVICES')}",
    )
    record(
        "User 65534:65534",
        "works" if lines.get("uid") == "65534:65534" else "WRONG",
        lines.get("uid", ""),
    )
    caps = {
        k: v.strip()
        for k, v in (ln.split(":", 1) for ln in out.splitlines() if ln.startswith(("Cap", "NoNew")))
    }
    record(
        "CapDrop ALL + CapAdd SYS_NICE",
        "works" if caps.get("CapBnd") == "0000000000800000" else "WRONG",
        f"CapBnd={caps.get('CapBnd')} CapEff={caps.get('CapEff')}",
    )
    record(
        "SecurityOpt no-new-privileges",
        "works" if caps.get("NoNewPrivs") == "1" else "IGNORED",
        f"NoNewPrivs={caps.get('NoNewPrivs')}",
    )
    record(
        "ShmSize",
        "works" if lines.get("shm_kb") == str(SHM // 1024) else "WRONG",
        f"shm_kb={lines.get('shm_kb')}",
    )
    # Podman in a container on cgroup v1: the container's cgroup path is the host's,
    # not under its /sys/fs/cgroup/memory: the limit is not visible there (the OOM case
    # below shows whether it holds).
    record(
        "Memory/MemorySwap",
        "works" if lines.get("mem") == str(MEM) else "UNSEEN",
        f"mem={lines.get('mem')} memsw={lines.get('memsw')} cgroup={lines.get('memcg')}",
    )
    record(
        "NetworkMode none",
        "works" if lines.get("net", "").split() == ["lo"] else "WRONG",
        f"net={lines.get('net')}",
    )
    record(
        "Init false",
        "works" if lines.get("pid1", "").startswith("sh ") else "WRONG",
        f"pid1={lines.get('pid1', '')[:30]}",
    )
    host_out = os.path.join(exchange, "out.txt")
    record(
        "bind rw (exchange dir)",
        "works" if lines.get("in") == "input-from-host" and os.path.exists(host_out) else "WRONG",
        f"in={lines.get('in')} out.txt on host={os.path.exists(host_out)}",
    )
    record(
        "bind ro (helper file)",
        "works"
        if "helper-readonly" in out and lines.get("helper") == "print('helper')"
        else "WRONG",
        "read-only" if "helper-readonly" in out else "writable or missing",
    )
    st = await guarded("inspect", c.show)
    if st is not FAILED:
        s = st["State"]
        hc = st["HostConfig"]
        record(
            "inspect State",
            "works",
            f"Status={s.get('Status')} ExitCode={s.get('ExitCode')} OOMKilled={s.get('OOMKilled')}",
        )
        record(
            "inspect Labels",
            "works"
            if all(st["Config"]["Labels"].get(k) == v for k, v in LABELS.items())
            else "WRONG",
        )
        record(
            "inspect HostConfig",
            "info",
            f"LogConfig={hc.get('LogConfig')} DeviceRequests={hc.get('DeviceRequests')} "
            f"Init={hc.get('Init')} NetworkMode={hc.get('NetworkMode')} Memory={hc.get('Memory')} "
            f"MemorySwap={hc.get('MemorySwap')} ShmSize={hc.get('ShmSize')} "
            f"CapAdd={hc.get('CapAdd')} "
            f"CapDrop={hc.get('CapDrop')} SecurityOpt={hc.get('SecurityOpt')}",
        )
    try:
        logs = await asyncio.wait_for(c.log(stdout=True, stderr=True), 30)
        record("logs (LogConfig none)", "info", f"{len(''.join(logs))} B returned")
    except Exception as exc:  # noqa: BLE001
        record("logs (LogConfig none)", "info", err(exc))

    # -- list by label -----------------------------------------------------------------------
    for form, filters in (
        ("json str", json.dumps({"label": ["llem.managed=1", "llem.probe=podman-api"]})),
        ("dict", {"label": ["llem.managed=1", "llem.probe=podman-api"]}),
    ):
        lst = await guarded(
            f"list by label ({form})", lambda f=filters: docker.containers.list(all=True, filters=f)
        )
        if lst is not FAILED:
            ids = {x.id for x in lst}
            record(
                f"list by label ({form})", "works" if c.id in ids else "WRONG", f"{len(lst)} found"
            )
    lst = await guarded(
        "list label no match",
        lambda: docker.containers.list(
            all=True, filters=json.dumps({"label": ["llem.probe=nothing"]})
        ),
    )
    if lst is not FAILED:
        record("list label no match", "works" if not lst else "WRONG", f"{len(lst)} found")

    # -- kill with a signal ------------------------------------------------------------------
    trap = "trap 'echo got-TERM; exit 3' TERM; echo ready; while true; do sleep 0.1; done"
    await kill_case(
        docker, made, tmp, "kill SIGTERM (trapped)", ["sh", "-c", trap], "SIGTERM", 3, "got-TERM"
    )
    await kill_case(
        docker,
        made,
        tmp,
        "kill SIGKILL",
        ["sh", "-c", "echo ready; sleep 300"],
        "SIGKILL",
        137,
        None,
    )

    await stop_case(docker, made, tmp)
    await oom_case(docker, made, tmp)
    await delete_case(docker, made, tmp)
    # -- variants ------------------------------------------------------------------------------
    await variant(
        docker,
        made,
        tmp,
        "default network (no NetworkMode)",
        {"NetworkMode": None},
        ["sh", "-c", "ls /sys/class/net | tr '\\n' ' '"],
    )
    await variant(
        docker,
        made,
        tmp,
        "unknown CDI device",
        {"DeviceRequests": [{"Driver": "cdi", "DeviceIDs": ["llem.test/gpu=GPU-nope"]}]},
        ["sh", "-c", "env | grep LLEM_CDI || echo none"],
    )
    await variant(
        docker,
        made,
        tmp,
        "DeviceRequests nvidia driver",
        {
            "DeviceRequests": [
                {"Driver": "nvidia", "DeviceIDs": [GPUS[0]], "Capabilities": [["gpu"]]}
            ]
        },
        ["sh", "-c", "env | grep LLEM_CDI || echo none"],
    )
    await variant(
        docker,
        made,
        tmp,
        "CDI DeviceIDs w/o Driver",
        {"DeviceRequests": [{"DeviceIDs": [f"llem.test/gpu={GPUS[2]}"]}]},
        ["sh", "-c", "env | grep LLEM_CDI || echo none"],
    )


async def started(
    docker: aiodocker.Docker, made: list[Any], tmp: str, name: str, cmd: list[str], **host: Any
) -> Any:
    """A container of DockerRunner's body, created and started; FAILED (recorded) if not."""
    ex, hp = new_exchange(tmp, f"c{len(made)}")
    try:
        c = await asyncio.wait_for(docker.containers.create(spec(cmd, ex, hp, **host)), 60)
        made.append(c)
        await asyncio.wait_for(c.start(), 60)
    except Exception as exc:  # noqa: BLE001
        record(name, "FAILS", f"create/start: {err(exc)}")
        return FAILED
    return c


async def stop_case(docker: aiodocker.Docker, made: list[Any], tmp: str) -> None:
    """Stop with a timeout; SIGTERM ignored, so SIGKILL after t."""
    cmd = ["sh", "-c", "trap '' TERM; echo ready; while true; do sleep 0.1; done"]
    c = await started(docker, made, tmp, "stop t=2", cmd)
    if c is FAILED:
        return
    await asyncio.sleep(1)
    t0 = time.monotonic()
    if await guarded("stop t=2", lambda: c.stop(t=2)) is FAILED:
        return
    took = time.monotonic() - t0
    s = (await c.show())["State"]
    record(
        "stop t=2",
        "works" if 1.5 < took < 6 and s.get("ExitCode") == 137 else "WRONG",
        f"took {took:.1f}s ExitCode={s.get('ExitCode')} Status={s.get('Status')}",
    )


async def oom_case(docker: aiodocker.Docker, made: list[Any], tmp: str) -> None:
    cmd = ["sh", "-c", "tail /dev/zero"]
    c = await started(
        docker, made, tmp, "OOM (Memory 16m)", cmd, Memory=16 << 20, MemorySwap=16 << 20
    )
    if c is FAILED:
        return
    await guarded("OOM wait", c.wait)
    s = (await c.show())["State"]
    record(
        "OOM State.OOMKilled",
        "works" if s.get("OOMKilled") else "NOT SET",
        f"OOMKilled={s.get('OOMKilled')} ExitCode={s.get('ExitCode')}",
    )


async def delete_case(docker: aiodocker.Docker, made: list[Any], tmp: str) -> None:
    c = await started(docker, made, tmp, "delete force (running)", ["sh", "-c", "sleep 300"])
    if c is FAILED:
        return
    if await guarded("delete force (running)", lambda: c.delete(force=True, v=True)) is FAILED:
        return
    try:
        await c.show()
        record("delete force (running)", "WRONG", "still there")
    except aiodocker.DockerError as exc:
        record(
            "delete force (running)",
            "works" if exc.status == 404 else "WRONG",
            f"then inspect: {exc.status}",
        )


async def kill_case(
    docker: aiodocker.Docker,
    made: list[Any],
    tmp: str,
    name: str,
    cmd: list[str],
    sig: str,
    want_code: int,
    want_out: str | None,
) -> None:
    ex, hp = new_exchange(tmp, name.split()[1].lower())
    c = await guarded(name, lambda: docker.containers.create(spec(cmd, ex, hp)))
    if c is FAILED:
        return
    made.append(c)
    stream = c.attach(stdout=True, stderr=True)
    try:
        await asyncio.wait_for(stream.__aenter__(), 60)
        await asyncio.wait_for(c.start(), 60)
    except Exception as exc:  # noqa: BLE001
        record(name, "FAILS", f"attach/start: {err(exc)}")
        return
    reader = asyncio.ensure_future(read_all(stream))
    await asyncio.sleep(1)
    if await guarded(name, lambda: c.kill(signal=sig)) is FAILED:
        await c.kill(signal="SIGKILL")
    await guarded(f"{name} wait", c.wait)
    out, _ = await asyncio.wait_for(reader, 30)
    await stream.close()
    s = (await c.show())["State"]
    ok = s.get("ExitCode") == want_code and (want_out is None or want_out in out)
    record(name, "works" if ok else "WRONG", f"ExitCode={s.get('ExitCode')} out={out.strip()!r}")


async def variant(
    docker: aiodocker.Docker,
    made: list[Any],
    tmp: str,
    name: str,
    host: dict[str, Any],
    cmd: list[str],
) -> None:
    ex, hp = new_exchange(tmp, f"v{len(made)}")
    try:
        c = await asyncio.wait_for(docker.containers.create(spec(cmd, ex, hp, **host)), 60)
    except Exception as exc:  # noqa: BLE001
        record(name, "create FAILS", err(exc))
        return
    made.append(c)
    stream = c.attach(stdout=True, stderr=True)
    try:
        await asyncio.wait_for(stream.__aenter__(), 60)
    except Exception as exc:  # noqa: BLE001
        record(name, "attach FAILS", err(exc))
        try:
            await asyncio.wait_for(c.start(), 60)
            record(name, "start works", "(after the failed attach)")
        except Exception as exc2:  # noqa: BLE001
            record(name, "start FAILS", err(exc2))
        return
    reader = asyncio.ensure_future(read_all(stream))
    try:
        await asyncio.wait_for(c.start(), 60)
    except Exception as exc:  # noqa: BLE001
        record(name, "start FAILS", err(exc))
        reader.cancel()
        await stream.close()
        return
    await asyncio.wait_for(c.wait(), 60)
    out, errs = await asyncio.wait_for(reader, 30)
    await stream.close()
    s = (await c.show())["State"]
    record(name, "runs", f"ExitCode={s.get('ExitCode')} out={(out + errs).strip()!r}")


async def main(urls: list[str]) -> None:
    for url in urls:
        results.clear()
        await probe(url)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:] or ["unix:///run/llem-podman/podman.sock"]))
