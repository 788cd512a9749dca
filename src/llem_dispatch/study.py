"""Studies: the study file, its expansion into experiments, runner choice, and run_study.

A study run writes a results dir that survives crashes: an append-only,
fsynced journal, one record file per experiment (atomic), and resume that
skips what already succeeded and never writes a result twice.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import structlog
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llem_dispatch import _labels
from llem_dispatch._exchange import atomic_write
from llem_dispatch.dispatcher import (
    Dispatcher,
    Event,
    ExperimentFailed,
    ExperimentFinished,
    ExperimentQueued,
    ExperimentRetried,
    ExperimentStarted,
    RetryPolicy,
    RunRecord,
)
from llem_dispatch.errors import ClusterError, ConfigError, DockerImagePullError
from llem_dispatch.gpu import GpuPool
from llem_dispatch.models import canonical_json, compute_config_hash
from llem_dispatch.runners._base import Outcome, Runner, RunObserver

if TYPE_CHECKING:
    from llem_dispatch.cluster import NodeContext, RayDispatcher

__all__ = [
    "BuildSpec",
    "Experiment",
    "Journal",
    "RoutingRunner",
    "RunnerSpec",
    "Study",
    "StudyRunnerFactory",
    "StudySummary",
    "build_pool",
    "cluster_requirements",
    "cluster_runner_spec",
    "completed_keys",
    "detect_runner",
    "docker_available",
    "ensure_image",
    "expand_study",
    "get_default_image",
    "iter_records",
    "load_study",
    "make_runner",
    "parse_runner_value",
    "resolve_runner",
    "run_study",
    "runner_choice",
]

log = structlog.get_logger("llem_dispatch.study")

# docker's reference grammar, simplified: [registry[:port]/]name[:tag][@digest]
_IMAGE_RE = re.compile(
    r"^(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[\w][\w.-]{0,127})?"
    r"(?:@sha256:[a-f0-9]{64})?$"
)
_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _check_image(value: str) -> str:
    if not _IMAGE_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid image reference (e.g. 'name:tag' or "
            "'registry/name@sha256:...'; lowercase name)"
        )
    return value


def _interpolate(value: str) -> str:
    """`${VAR}` / `${VAR:-default}` from the environment (for build args)."""
    return _ENV_REF.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


class BuildSpec(BaseModel):
    """How to build the study's image when it is missing (like docker compose's `build:`)."""

    model_config = ConfigDict(extra="forbid")

    context: str = Field(description="Build context, relative to the study file.")
    dockerfile: str | None = None
    args: dict[str, str] = Field(
        default_factory=dict, description="Build args; `${VAR:-default}` reads the env."
    )


class Study(BaseModel):
    """A sweep: what to run, over which parameters, on which runner and GPUs."""

    model_config = ConfigDict(extra="forbid")

    name: str = "study"
    runner: str | None = Field(default=None, description="local | docker | docker:IMAGE | auto")
    cluster: str | None = Field(
        default=None,
        description="Run on a Ray cluster: its address (auto | HOST:6379 | ray://HOST:10001).",
    )
    image: str | None = None
    images: dict[str, str] = Field(
        default_factory=dict, description="Per-backend images, chosen by `image_field`."
    )
    image_field: str = "backend"
    build: BuildSpec | None = None
    command: list[str] | None = None
    function: str | None = Field(default=None, description="module:function run by the helper")
    workdir: str | None = Field(
        default=None, description="Local runner's cwd (default: the study's folder)"
    )
    base: dict[str, Any] = Field(default_factory=dict)
    configs: list[dict[str, Any]] = Field(default_factory=list)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    gpus_per_experiment: int = Field(default=0, ge=0)
    n_cycles: int = Field(default=1, ge=1)
    cycle_order: Literal["sequential", "interleaved", "shuffled"] = "sequential"
    seed: int | None = None
    experiment_gap_s: float = Field(default=0.0, ge=0)
    cycle_gap_s: float = Field(default=0.0, ge=0)
    timeout_s: float | None = Field(default=None, gt=0)
    silence_timeout_s: float | None = Field(default=None, gt=0)
    max_concurrency: int | None = Field(default=None, ge=1)
    gpus: list[str] | Literal["auto"] | None = None
    virtual_gpus: int | None = Field(default=None, ge=1)
    gpu_passthrough: bool | None = None
    retries: int = Field(default=3, ge=0)
    stop_grace_s: float = Field(
        default=10.0, ge=0, description="On interrupt: SIGTERM, then SIGKILL after this."
    )
    shm_size: str = "8g"
    network: str | None = None
    user: str | None = None
    cap_add: list[str] = Field(default_factory=list)
    mem_limit: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra Docker labels on every container."
    )

    @field_validator("image")
    @classmethod
    def _image_ok(cls, value: str | None) -> str | None:
        return _check_image(value) if value is not None else None

    @field_validator("images")
    @classmethod
    def _images_ok(cls, value: dict[str, str]) -> dict[str, str]:
        for image in value.values():
            _check_image(image)
        return value

    @field_validator("function")
    @classmethod
    def _function_ok(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[\w.]+:[\w.]+$", value):
            raise ValueError(f"{value!r} must look like 'package.module:function'")
        return value

    @field_validator("runner")
    @classmethod
    def _runner_ok(cls, value: str | None) -> str | None:
        if value is not None:
            parse_runner_value(value)
        return value

    @field_validator("grid")
    @classmethod
    def _grid_ok(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, options in value.items():
            if not options:
                raise ValueError(f"grid.{key} is an empty list: give at least one value")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Study:
        if not self.configs and not self.grid and not self.base:
            raise ValueError("the study has no experiments: give `configs:` or `grid:`")
        if self.command is not None and self.function is not None:
            raise ValueError("give either `command:` or `function:`, not both")
        if self.gpus is not None and self.virtual_gpus is not None:
            raise ValueError("give either `gpus:` or `virtual_gpus:`, not both")
        return self


@dataclass(frozen=True, slots=True)
class Experiment:
    """One run of one config in one cycle."""

    config: dict[str, Any]
    config_hash: str
    cycle: int
    gpus: int

    @property
    def key(self) -> str:
        return f"{self.config_hash}_c{self.cycle}"


# -- loading ---------------------------------------------------------------------------


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key, by dotted path."""


def _key_lines(node: yaml.Node, prefix: tuple[Any, ...], out: dict[tuple[Any, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            out[path] = key_node.start_mark.line + 1
            _key_lines(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, index)
            out[path] = item.start_mark.line + 1
            _key_lines(item, path, out)


def load_study(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> Study:
    """Load and validate a study file; every problem is reported at once with its line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"cannot read study file {path}: {exc.strerror}", fix_suggestion="Check the path."
        ) from exc
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: not valid YAML: {exc}",
            fix_suggestion="Fix the YAML syntax at the line shown.",
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the study must be a YAML mapping of fields",
            fix_suggestion="Start from examples/quickstart/study.yaml.",
        )
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _key_lines(node, (), lines)
    data.update(overrides or {})
    try:
        return Study.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
            where = f"{path}:{line}" if line else str(path)
            field_name = ".".join(str(p) for p in loc) or "<study>"
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                message = f"unknown field (allowed: {', '.join(sorted(Study.model_fields))})"
            problems.append(f"  {where}: {field_name}: {message}")
        raise ConfigError(
            f"{path}: {len(problems)} problem(s) in the study file:\n" + "\n".join(problems),
            fix_suggestion="Correct each field listed above; nothing was run.",
        ) from exc


# -- expansion ---------------------------------------------------------------------------


def _configs(study: Study) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{**study.base, **c} for c in study.configs]
    if study.grid:
        keys = list(study.grid)
        for values in itertools.product(*(study.grid[k] for k in keys)):
            out.append({**study.base, **dict(zip(keys, values, strict=True))})
    if not out and study.base:
        out.append(dict(study.base))
    return out


def expand_study(study: Study) -> list[Experiment]:
    """Every (config, cycle) in dispatch order; duplicate configs are dropped with a warning."""
    seen: dict[str, dict[str, Any]] = {}
    for config in _configs(study):
        config_hash = compute_config_hash(config)
        if config_hash in seen:
            log.warning(
                "duplicate_config_dropped",
                config_hash=config_hash,
                config=canonical_json(config)[:200],
            )
            continue
        seen[config_hash] = config
    unique = list(seen.items())
    k = study.gpus_per_experiment

    def exp(item: tuple[str, dict[str, Any]], cycle: int) -> Experiment:
        return Experiment(config=item[1], config_hash=item[0], cycle=cycle, gpus=k)

    cycles = range(1, study.n_cycles + 1)
    if study.cycle_order == "sequential":
        return [exp(item, c) for item in unique for c in cycles]
    if study.cycle_order == "interleaved":
        return [exp(item, c) for c in cycles for item in unique]
    rng = random.Random(study.seed)  # noqa: S311 - ordering, not security
    ordered: list[Experiment] = []
    for c in cycles:
        batch = list(unique)
        rng.shuffle(batch)
        ordered.extend(exp(item, c) for item in batch)
    return ordered


# -- runner choice -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunnerSpec:
    """Which runner to use, with which image, and why (recorded in every result)."""

    kind: Literal["local", "docker", "auto"]
    image: str | None = None
    source: str = "explicit"


def parse_runner_value(value: str) -> RunnerSpec:
    """'local' | 'docker' | 'docker:IMAGE' | 'auto' -> RunnerSpec, or a clear error."""
    text = value.strip()
    if text in {"local", "docker", "auto"}:
        return RunnerSpec(kind=text)  # type: ignore[arg-type]
    if text.startswith("docker:"):
        image = text.removeprefix("docker:")
        try:
            _check_image(image)
        except ValueError as exc:
            raise ConfigError(
                f"runner {value!r}: {exc}", fix_suggestion="Use docker:name:tag."
            ) from exc
        return RunnerSpec(kind="docker", image=image)
    raise ConfigError(
        f"runner value {value!r} is not one of: local, docker, docker:IMAGE, auto",
        fix_suggestion="Set --runner / LLEM_RUNNER / the study's `runner:` to local, docker, "
        "docker:IMAGE or auto.",
    )


def docker_available(timeout: float = 3.0) -> bool:
    """Whether a Docker daemon answers on this host (a quick API ping)."""
    import socket

    url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not url.startswith("unix://"):
        return (
            shutil.which("docker") is not None
            and subprocess.run(
                ["docker", "version"], capture_output=True, timeout=timeout, check=False
            ).returncode
            == 0
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(url.removeprefix("unix://"))
        sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        return b"200 OK" in sock.recv(256)
    except OSError:
        return False
    finally:
        sock.close()


def runner_choice(
    explicit: str | None, study: Study, *, environ: Mapping[str, str] | None = None
) -> RunnerSpec | None:
    """explicit > LLEM_RUNNER > study file; None when the first one set says auto (or none is)."""
    env = os.environ if environ is None else environ
    for value, source in (
        (explicit, "explicit"),
        (env.get("LLEM_RUNNER"), "env"),
        (study.runner, "study"),
    ):
        if value:
            spec = parse_runner_value(value)
            if spec.kind != "auto":
                return RunnerSpec(spec.kind, spec.image or study.image, source)
            return None
    return None


def resolve_runner(
    explicit: str | None,
    study: Study,
    *,
    environ: Mapping[str, str] | None = None,
    probe: Callable[[], bool] = docker_available,
) -> RunnerSpec:
    """explicit > LLEM_RUNNER > study file > auto-detect (docker if a daemon answers)."""
    chosen = runner_choice(explicit, study, environ=environ)
    return chosen if chosen is not None else detect_runner(study, probe=probe)


def detect_runner(study: Study, *, probe: Callable[[], bool] = docker_available) -> RunnerSpec:
    """`auto`: docker if a daemon answers here, else local (said in one warning)."""
    if probe():
        return RunnerSpec("docker", study.image, "auto")
    log.warning(
        "no_docker_daemon",
        message="No Docker daemon reachable: falling back to the local subprocess "
        "runner (experiments run on this host, not in containers).",
    )
    return RunnerSpec("local", None, "auto")


def cluster_runner_spec(explicit: str | None, study: Study) -> RunnerSpec:
    """On a cluster: explicit > LLEM_RUNNER > study file, else `auto`, decided on each node."""
    return runner_choice(explicit, study) or RunnerSpec("auto", study.image, "auto")


def cluster_requirements(
    study: Study, spec: RunnerSpec, experiments: Iterable[Experiment], study_dir: Path
) -> tuple[list[str], list[str]]:
    """What a host needs to run the study: its images (docker) and its folder (local)."""
    use_docker = spec.kind == "docker" or (spec.kind == "auto" and (study.image or study.images))
    images = study_images(study, spec, experiments) if use_docker else []
    paths = [str(study_dir.resolve())] if spec.kind != "docker" else []
    return images, paths


def get_default_image(
    backend: str,
    images: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The image for a backend: LLEM_IMAGE_<BACKEND> > the study's `images:` > error."""
    env = os.environ if environ is None else environ
    var = "LLEM_IMAGE_" + re.sub(r"\W", "_", backend).upper()
    if env.get(var):
        return _check_image(env[var])
    if images and backend in images:
        return images[backend]
    raise ConfigError(
        f"no image configured for backend {backend!r}",
        fix_suggestion=f"Set {var}=IMAGE or add `images: {{{backend}: IMAGE}}` to the study.",
    )


class RoutingRunner:
    """Sends each config to the runner of its backend (one image per backend)."""

    runner_type = "docker"

    def __init__(self, field_name: str, runners: Mapping[str, Runner]) -> None:
        self.field_name = field_name
        self.runners = dict(runners)

    async def run(
        self,
        config: BaseModel | Mapping[str, Any],
        *,
        gpus: Any = None,
        observer: RunObserver | None = None,
    ) -> Outcome:
        data = config.model_dump() if isinstance(config, BaseModel) else dict(config)
        backend = str(data.get(self.field_name))
        runner = self.runners.get(backend)
        if runner is None:
            raise ConfigError(
                f"config has {self.field_name}={backend!r}, which has no image",
                fix_suggestion=f"Add images.{backend} to the study or set "
                f"LLEM_IMAGE_{backend.upper()}.",
            )
        return await runner.run(config, gpus=gpus, observer=observer)

    async def aclose(self) -> None:
        for runner in self.runners.values():
            await runner.aclose()


def study_images(study: Study, spec: RunnerSpec, experiments: Iterable[Experiment]) -> list[str]:
    """Every image the study will run, resolved per backend when `images:` is used."""
    if spec.image:
        return [spec.image]
    if study.images:
        backends = sorted({str(e.config.get(study.image_field)) for e in experiments})
        return [get_default_image(b, study.images) for b in backends]
    if study.image:
        return [study.image]
    raise ConfigError(
        "the study names no image and the runner is docker",
        fix_suggestion="Add `image:` to the study, or run with --runner local.",
    )


def make_runner(
    study: Study,
    spec: RunnerSpec,
    *,
    study_dir: Path,
    labels: Mapping[str, str] | None = None,
    experiments: Iterable[Experiment] = (),
    virtual: bool = False,
    exchange_base: Path | None = None,
) -> Runner:
    """Build the runner a study asks for."""
    from llem_dispatch.runners.docker import DockerRunner
    from llem_dispatch.runners.local import LocalRunner

    if spec.kind == "local":
        if study.command is None and study.function is None:
            raise ConfigError(
                "the local runner needs `command:` or `function:` in the study",
                fix_suggestion="Add `function: module:function` to the study.",
            )
        cwd = study_dir / study.workdir if study.workdir else study_dir
        return LocalRunner(
            study.command,
            function=study.function,
            timeout=study.timeout_s,
            source=spec.source,
            env=study.env,
            cwd=cwd,
            silence_timeout=study.silence_timeout_s,
            exchange_base=exchange_base,
            stop_grace_s=study.stop_grace_s,
        )

    def docker(image: str) -> DockerRunner:
        return DockerRunner(
            image,
            timeout=study.timeout_s,
            source=spec.source,
            command=study.command,
            function=study.function,
            env=study.env,
            shm_size=study.shm_size,
            gpu_passthrough=study.gpu_passthrough
            if study.gpu_passthrough is not None
            else not virtual,
            silence_timeout=study.silence_timeout_s,
            network=study.network,
            user=study.user,
            cap_add=study.cap_add,
            mem_limit=study.mem_limit,
            labels={**study.labels, **(labels or {})},
            stop_grace_s=study.stop_grace_s,
            exchange_base=exchange_base,
        )

    if spec.image is None and study.images:
        experiments = list(experiments)
        backends = sorted({str(e.config.get(study.image_field)) for e in experiments})
        return RoutingRunner(
            study.image_field, {b: docker(get_default_image(b, study.images)) for b in backends}
        )
    images = study_images(study, spec, experiments)
    return docker(images[0])


@dataclass(frozen=True)
class StudyRunnerFactory:
    """Builds a study's runner on a cluster node (pickled and shipped there by Ray).

    A runner left on `auto` is decided per node: docker where a daemon answers.
    Exchange dirs go in the results dir on the driver's own host, else in the
    node's temp dir; a failure's record names the node that keeps it.
    """

    study: Study
    spec: RunnerSpec
    study_dir: Path
    labels: Mapping[str, str]
    #: One experiment per backend (all `make_runner` needs to route by `image_field`).
    experiments: tuple[Experiment, ...]
    exchange_base: Path

    def __call__(self, node: NodeContext) -> Runner:
        spec = detect_runner(self.study) if self.spec.kind == "auto" else self.spec
        exchange: Path | None = None
        if node.driver_host:
            exchange = self.exchange_base
            exchange.mkdir(parents=True, exist_ok=True, mode=0o700)
        return make_runner(
            self.study,
            spec,
            study_dir=self.study_dir,
            labels=self.labels,
            experiments=self.experiments,
            virtual=node.virtual,
            exchange_base=exchange,
        )


def ensure_image(
    study: Study, image: str, *, study_dir: Path, output: Callable[[str], None] = print
) -> bool:
    """Build `image` from the study's `build:` context if missing; True if it was built."""
    probe = subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False)
    if probe.returncode == 0:
        return False
    if study.build is None:
        raise DockerImagePullError(
            f"image {image!r} is not present on this Docker host and the study has no "
            "`build:` context",
            fix_suggestion=f"Build it (`docker build -t {image} DIR`), pull it "
            f"(`docker pull {image}`), or add `build: {{context: DIR}}` to the study.",
        )
    context = (study_dir / study.build.context).resolve()
    cmd = ["docker", "build", "-t", image]
    if study.build.dockerfile:
        cmd += ["-f", str(context / study.build.dockerfile)]
    for key, value in study.build.args.items():
        cmd += ["--build-arg", f"{key}={_interpolate(value)}"]
    cmd.append(str(context))
    output(f"building {image} from {context} ...")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            output("  " + line.rstrip())
            tail = [*tail[-19:], line.rstrip()]
    if proc.returncode != 0:
        raise DockerImagePullError(
            f"building {image} from {context} failed (exit {proc.returncode})",
            fix_suggestion="Fix the Dockerfile or its base image (set build args such as "
            "BASE_IMAGE to an image present locally); the build output is above.",
            stderr_snippet="\n".join(tail),
        )
    return True


# -- running -------------------------------------------------------------------------------


class StudySummary(BaseModel):
    """How a study run ended."""

    name: str
    results_dir: str
    total: int
    succeeded: int
    failed: int
    errored: int
    skipped: int
    interrupted: bool = False
    duration_s: float
    runner: str
    records: list[RunRecord] = Field(default_factory=list, exclude=True)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.failed == 0 and self.errored == 0 else 1


class Journal:
    """Append-only JSON lines; completions are fsynced so a crash loses only in-flight runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, event: str, *, sync: bool = False, **fields: Any) -> None:
        line = {"ts": time.time(), "event": event, **fields}
        self._file.write(json.dumps(line, default=str, sort_keys=True) + "\n")
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _atomic_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str, sort_keys=True)
    atomic_write(path, text.encode("utf-8"), mode=0o644)


def completed_keys(results_dir: Path) -> set[str]:
    """Keys ('{hash}_c{cycle}') that already have a successful record."""
    done: set[str] = set()
    records = results_dir / "records"
    if not records.is_dir():
        return done
    for path in records.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("status") == "succeeded":
            done.add(path.stem)
    return done


def iter_records(results_dir: Path) -> Iterator[dict[str, Any]]:
    """Every record file of a results dir, parsed."""
    for path in sorted((results_dir / "records").glob("*.json")):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            yield json.loads(path.read_text())


def build_pool(
    study: Study, *, gpus: list[str] | str | None = None, virtual_gpus: int | None = None
) -> GpuPool:
    """The GPU pool from CLI options, else the study, else detection."""
    cooldown = study.experiment_gap_s
    if virtual_gpus is not None:
        return GpuPool.virtual_devices(virtual_gpus, cooldown_s=cooldown)
    chosen = gpus if gpus is not None else study.gpus
    if chosen == "auto" or (chosen is None and study.virtual_gpus is None):
        return GpuPool.detect(cooldown_s=cooldown)
    if chosen is not None:
        return GpuPool(list(chosen), cooldown_s=cooldown)
    assert study.virtual_gpus is not None
    return GpuPool.virtual_devices(study.virtual_gpus, cooldown_s=cooldown)


async def run_study(
    study: Study,
    results_dir: str | Path,
    *,
    runner: Runner | None = None,
    pool: GpuPool | None = None,
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
    max_concurrency: int | None = None,
    study_dir: str | Path | None = None,
    runner_value: str | None = None,
    retry_policy: RetryPolicy | None = None,
    reap_orphans: bool = True,
    cluster: str | None = None,
    cluster_options: Mapping[str, Any] | None = None,
) -> StudySummary:
    """Run every experiment of `study`, writing records and a journal to `results_dir`.

    With `resume=True`, experiments that already succeeded there are skipped and
    failed or interrupted ones run again; each experiment ends with one record file.
    With `cluster` (or the study's `cluster:`), a Ray cluster's address, the
    experiments run on its nodes; records and the journal are still written here only.
    `cluster_options` go to `RayDispatcher` (e.g. `placement_timeout_s`, `runtime_env`).
    """
    started = time.monotonic()
    results = Path(results_dir).resolve()
    study_dir = Path(study_dir) if study_dir is not None else Path.cwd()
    records_dir = results / "records"
    if records_dir.is_dir() and any(records_dir.iterdir()) and not resume:
        raise ConfigError(
            f"results dir {results} already holds records",
            fix_suggestion="Pass resume=True / --resume to continue it, or use a new dir.",
        )
    if study.cycle_order == "shuffled" and study.seed is None:
        # Record the seed (in study.yaml) so the order can be reproduced.
        study = study.model_copy(update={"seed": random.SystemRandom().randrange(2**31)})
    cluster = cluster or study.cluster
    experiments = expand_study(study)
    needed = max((e.gpus for e in experiments), default=0)
    labels = {_labels.LABEL_RESULTS_DIR: str(results)}
    # Exchange dirs live in the results dir: a failure's kept dir sits beside its record.
    exchange_dirs = results / "exchange"
    in_flight: dict[str, Experiment] = {}
    records: list[RunRecord] = []
    interrupted = False
    journal: Journal | None = None

    def on_dispatch_event(event: Event) -> None:
        assert journal is not None
        match event:
            case ExperimentStarted():
                where: dict[str, Any] = {"node": event.node} if event.node else {}
                journal.write(
                    "started",
                    key=event.tags.get("key"),
                    gpu_ids=list(event.gpu_ids),
                    attempt=event.attempt,
                    container_id=event.container_id,
                    pid=event.process_id,
                    **where,
                )
            case ExperimentRetried():
                journal.write(
                    "retried",
                    key=event.tags.get("key"),
                    attempt=event.attempt,
                    error=event.error,
                    delay_s=event.delay_s,
                )
            case ExperimentQueued() | ExperimentFinished() | ExperimentFailed():
                pass
        if on_event is not None:
            on_event(event)

    limit = max_concurrency or study.max_concurrency
    retries = retry_policy or RetryPolicy(max_attempts=study.retries + 1)
    spec: RunnerSpec | None = None
    dispatcher: Dispatcher
    ray_dispatcher: RayDispatcher | None = None
    if cluster:
        from llem_dispatch.cluster import RayDispatcher

        if runner is not None or pool is not None:
            raise ConfigError(
                "a cluster study builds its runners on each node: runner= and pool= "
                "cannot be used with cluster=",
                fix_suggestion="Drop runner=/pool= (choose with runner_value=), or run "
                "without a cluster.",
            )
        if study.gpus is not None or study.virtual_gpus is not None:
            log.warning(
                "study_gpus_ignored_on_cluster",
                message="`gpus:`/`virtual_gpus:` choose GPUs of one host; on a Ray cluster, "
                "Ray assigns each node's GPUs (set them with `ray start --num-gpus N`).",
            )
        spec = cluster_runner_spec(runner_value, study)
        # Shipped to every attempt: one experiment per backend, not the whole study.
        per_backend = {str(e.config.get(study.image_field)): e for e in experiments}
        factory = StudyRunnerFactory(
            study,
            spec,
            study_dir.resolve(),
            labels,
            tuple(per_backend.values()) if study.images else (),
            exchange_dirs,
        )
        ray_dispatcher = RayDispatcher(
            factory,
            address=cluster,
            cooldown_s=study.experiment_gap_s,
            max_concurrency=limit,
            retries=retries,
            on_event=on_dispatch_event,
            runner_type=spec.kind,
            **{"cancel_timeout_s": study.stop_grace_s + 30, **(cluster_options or {})},
        )
        ray_dispatcher.check_request(needed)
        await _preflight(ray_dispatcher, study, spec, experiments, study_dir, needed)
        placement: dict[str, Any] = {
            "cluster": cluster,
            "cluster_gpus": ray_dispatcher.cluster_gpus(),
        }
        dispatcher = ray_dispatcher
    else:
        pool = pool if pool is not None else build_pool(study)
        pool.check_request(needed)
        if runner is None:
            spec = resolve_runner(runner_value, study)
            runner = make_runner(
                study,
                spec,
                study_dir=study_dir,
                labels=labels,
                experiments=experiments,
                virtual=pool.virtual,
                exchange_base=exchange_dirs,
            )
        placement = {"gpus": list(pool.devices), "virtual_gpus": pool.virtual}
        dispatcher = Dispatcher(
            runner,
            pool=pool,
            max_concurrency=limit,
            retries=retries,
            on_event=on_dispatch_event,
        )
    runner_name = spec.kind if spec is not None else (dispatcher.runner_type or "custom")
    exchange_dirs.mkdir(parents=True, exist_ok=True, mode=0o700)
    records_dir.mkdir(parents=True, exist_ok=True)
    if reap_orphans and ray_dispatcher is not None:
        await _sweep_cluster(ray_dispatcher, results, study_over=False)
    elif reap_orphans and runner_name == "docker":
        from llem_dispatch.reap import reap

        await reap(results_dir=results, logs_dir=results / "orphans")
    done = completed_keys(results) if resume else set()
    todo = [e for e in experiments if e.key not in done]
    _atomic_json(
        results / "study.json",
        {
            "study": study.model_dump(mode="json"),
            "runner": runner_name,
            "runner_source": spec.source if spec else "explicit",
            **placement,
            "experiments": len(experiments),
        },
    )
    (results / "study.yaml").write_text(
        yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
    )
    journal = Journal(results / "journal.jsonl")
    journal.write(
        "study_started",
        sync=True,
        name=study.name,
        total=len(experiments),
        todo=len(todo),
        skipped=len(done),
        resume=resume,
        runner=runner_name,
        pid=os.getpid(),
        session=_labels.SESSION_ID,
        **({"cluster": cluster} if cluster else {}),
    )
    window = anyio.Semaphore(max(1, 2 * dispatcher.parallelism()))

    async def one(exp: Experiment) -> None:
        assert journal is not None
        try:
            in_flight[exp.key] = exp
            record = await dispatcher.run(
                exp.config, gpus=exp.gpus, tags={"key": exp.key, "cycle": exp.cycle}
            )
            payload = record.model_dump(mode="json")
            payload["cycle"] = exp.cycle
            payload["key"] = exp.key
            _atomic_json(records_dir / f"{exp.key}.json", payload)
            journal.write(
                record.status,
                sync=True,
                key=exp.key,
                config_hash=exp.config_hash,
                cycle=exp.cycle,
                gpu_ids=record.gpu_ids,
                error=record.error.type if record.error else None,
                exchange_dir=record.exchange_dir,
                **_node_field(record),
            )
            records.append(record)
            in_flight.pop(exp.key, None)
        finally:
            window.release()

    groups: list[list[Experiment]] = [todo]
    if study.cycle_gap_s > 0 and study.n_cycles > 1:
        groups = [[e for e in todo if e.cycle == c] for c in range(1, study.n_cycles + 1)]
    try:
        async with dispatcher:
            try:
                for index, group in enumerate(groups):
                    if index and study.cycle_gap_s:
                        journal.write("cycle_gap", seconds=study.cycle_gap_s)
                        await anyio.sleep(study.cycle_gap_s)
                    async with anyio.create_task_group() as tg:
                        for exp in group:
                            await window.acquire()
                            tg.start_soon(one, exp)
            finally:
                if ray_dispatcher is not None and reap_orphans:
                    # Every experiment has its final record (or was cancelled and
                    # waited for): whatever container of this study is left on a
                    # node is abandoned, e.g. by a worker of a node that left.
                    with anyio.move_on_after(90, shield=True):
                        await _sweep_cluster(ray_dispatcher, results, study_over=True)
    except BaseException as exc:
        interrupted = isinstance(exc, anyio.get_cancelled_exc_class() | KeyboardInterrupt)
        journal.write(
            "interrupted" if interrupted else "crashed",
            sync=True,
            in_flight=sorted(in_flight),
            error=repr(exc)[:500],
        )
        journal.close()
        raise
    summary = StudySummary(
        name=study.name,
        results_dir=str(results),
        total=len(experiments),
        succeeded=sum(r.status == "succeeded" for r in records),
        failed=sum(r.status == "failed" for r in records),
        errored=sum(r.status in {"error", "cancelled"} for r in records),
        skipped=len(done),
        interrupted=interrupted,
        duration_s=round(time.monotonic() - started, 3),
        runner=runner_name,
        records=records,
    )
    _atomic_json(results / "summary.json", summary.model_dump(mode="json"))
    journal.write("study_finished", sync=True, **summary.model_dump(mode="json", exclude={"name"}))
    journal.close()
    return summary


async def _preflight(
    dispatcher: RayDispatcher,
    study: Study,
    spec: RunnerSpec,
    experiments: list[Experiment],
    study_dir: Path,
    gpus: int,
) -> None:
    """Before anything runs: can every host that may get an experiment run it?"""
    images, paths = cluster_requirements(study, spec, experiments, study_dir)
    folder = str(study_dir.resolve())
    checks = await dispatcher.preflight(images=images, paths=paths, gpus=gpus)
    problems: list[str] = []
    for check in checks:
        where = f"node {check.node.label} ({check.node.ip})"
        use_docker = spec.kind == "docker" or (spec.kind == "auto" and check.docker)
        if use_docker and not check.docker:
            problems.append(f"{where}: no Docker daemon answers there")
        elif use_docker:
            problems += [f"{where}: image {i} is not there" for i in check.missing_images]
        elif check.missing_paths:
            problems.append(f"{where}: the study folder {folder} does not exist there")
    if problems:
        raise ClusterError(
            f"{len(problems)} problem(s) on the cluster's nodes; nothing was run:\n  "
            + "\n  ".join(problems),
            fix_suggestion="Build or pull the image on each node named (or push it to a "
            "registry they reach), start Docker there, or copy the study folder to the same "
            "path; then run again.",
        )


def _node_field(record: RunRecord) -> dict[str, Any]:
    return {"node": record.node.label} if record.node else {}


async def _sweep_cluster(dispatcher: RayDispatcher, results: Path, *, study_over: bool) -> None:
    """Reap this study's orphaned containers on every host of the cluster."""
    for sweep in await dispatcher.sweep(
        results_dir=results, logs_dir=results / "orphans", study_over=study_over, timeout_s=60
    ):
        for item in sweep.reaped:
            log.warning(
                "cluster_orphan_reaped",
                node=sweep.node.label,
                container_id=str(item["container_id"])[:12],
                config_hash=item["config_hash"],
                log_path=item["log_path"],
            )
