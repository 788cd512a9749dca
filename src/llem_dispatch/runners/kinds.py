"""Runner kinds: the registry of engines a study can run on, by name (`runner: NAME`).

A kind is one class registered under its name: it says what it needs (an image,
an engine answering on the host), how it hands GPUs to an experiment, whether it
is available here, how to build its runner from a study's plain values, and its
own `doctor` checks. A kind that runs images owns them: it checks their references
(`check_image`), says which are missing, builds them on its own engine
(`ensure_image`), reaps its own leftovers and describes its own launch for
`--dry-run`, so no other module asks any engine for another kind. `runner:` in a
study, `--runner`, `LLEM_RUNNER`, doctor, runner choice and the Ray nodes all ask
this registry; no other module compares kind names.

Built-in kinds (`local`, `docker`) are registered as dotted paths and imported
the first time they are used, so naming a kind costs no heavy import. Kinds from
other packages arrive through the entry-point group `llem_dispatch.runners`
(`echo = "my_package:EchoRunnerKind"` under
`[project.entry-points."llem_dispatch.runners"]`), or at run time with
`register_runner_kind(name, cls_or_dotted_path)`. `runner_kinds` is a read-only
view of what is registered (name -> class or dotted path, as registered).

`auto` is not a kind but a choice rule (`choose_auto`): the first kind of
`AUTO_ORDER` whose needs the study meets and whose engine answers here.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import structlog

from llem_dispatch.errors import ConfigError, ImageError, LlemError

if TYPE_CHECKING:
    from llem_dispatch._exchange import ExchangeDir
    from llem_dispatch.reap import ReapedContainer
    from llem_dispatch.runners.protocol import Runner

__all__ = [
    "AUTO",
    "AUTO_ORDER",
    "ENTRY_POINT_GROUP",
    "DoctorCheck",
    "ImageBuild",
    "RunnerKind",
    "RunnerOptions",
    "choose_auto",
    "decide_kind",
    "find_runner_kind",
    "get_runner_kind",
    "kind_origin",
    "kinds_for",
    "known_runner_kinds",
    "parse_runner_value",
    "register_runner_kind",
    "registered_names",
    "runner_kinds",
]

log = structlog.get_logger("llem_dispatch.runners")

#: The entry-point group through which other packages register runner kinds.
ENTRY_POINT_GROUP = "llem_dispatch.runners"
#: The runner value that leaves the choice to `choose_auto`.
AUTO = "auto"
#: The auto rule's order of preference: the last one must always be available.
AUTO_ORDER: tuple[str, ...] = ("docker", "local")

#: The built-in kinds, by dotted path (imported on first use).
known_runner_kinds: Mapping[str, str] = MappingProxyType(
    {
        "docker": "llem_dispatch.runners.docker_kind:DockerRunnerKind",
        "local": "llem_dispatch.runners.local:LocalRunnerKind",
        "podman": "llem_dispatch.runners.podman_kind:PodmanRunnerKind",
    }
)


@dataclass(frozen=True, slots=True)
class DoctorCheck:
    """One line of `doctor`'s report: PASS when ok, else WARN (optional) or FAIL."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    #: A failed optional check (no GPUs on a CPU host) warns instead of failing.
    optional: bool = False


@dataclass(frozen=True, slots=True)
class RunnerOptions:
    """What a kind builds its runner from: a study's settings as plain values.

    Kinds take what applies to them: a host process has no `network` or `shm_size`.
    """

    command: tuple[str, ...] | None = None
    function: str | None = None
    timeout_s: float | None = None
    silence_timeout_s: float | None = None
    stop_grace_s: float = 10.0
    #: Why this kind was chosen (explicit, env, study, auto): recorded in every result.
    source: str = "explicit"
    env: Mapping[str, str] = field(default_factory=dict)
    #: The study's folder, and the working directory of a host process.
    study_dir: Path = Path()
    cwd: Path = Path()
    #: Mount the study folder read-only into the image (development runs).
    mount_study_dir: bool = False
    exchange_base: Path | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    #: The GPU ids are virtual: ask for no devices, set visibility variables only.
    virtual: bool = False
    gpu_passthrough: bool | None = None
    shm_size: str = "8g"
    network: str | None = None
    user: str | None = None
    cap_add: tuple[str, ...] = ()
    mem_limit: str | None = None
    #: Seconds each engine API call may take (by call name) before the engine counts as hung.
    api_deadlines: Mapping[str, float] = field(default_factory=dict)
    #: How a container engine is asked for GPUs (`auto`, `cdi`, `nvidia`), and the CDI kind.
    gpu_devices: Literal["auto", "cdi", "nvidia"] = "auto"
    cdi_kind: str = "nvidia.com/gpu"


@dataclass(frozen=True, slots=True)
class ImageBuild:
    """How to make a missing image: its build context (a folder), Dockerfile and args.

    Plain values (the study's `build:` resolved against its folder, args interpolated).
    """

    context: Path
    dockerfile: str | None = None
    args: Mapping[str, str] = field(default_factory=dict)


class RunnerKind:
    """One runner engine, registered under a name; subclass it for a new engine.

    The class attributes say what the kind needs; `build` makes its runner. The
    registry makes one instance per name (`RunnerKind(name)`).
    """

    #: Runs each experiment in an image (`runner: NAME:IMAGE` names one).
    needs_image: ClassVar[bool] = False
    #: Needs an engine answering on the host (a daemon); `available` asks it.
    needs_engine: ClassVar[bool] = False
    #: What the engine is called in messages ("Docker daemon").
    engine: ClassVar[str] = ""
    #: How an experiment gets its GPUs: visibility variables only, or engine device requests.
    gpu_request: ClassVar[Literal["env", "device_requests"]] = "env"
    #: Runs from the study's folder on the host (each host of a cluster needs it there).
    uses_study_folder: ClassVar[bool] = True
    #: Leaves labelled resources after a crash that `reap` removes (containers).
    reapable: ClassVar[bool] = False
    #: How the auto rule names this kind when it falls back to it.
    summary: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def available(self) -> bool:
        """Whether this kind can run here now (its engine answers); for `auto` and doctor."""
        return True

    def engine_url(self) -> str | None:
        """Where its engine's API is (kinds with an engine), for `reap` and the runner."""
        return None

    def build(self, options: RunnerOptions, image: str | None = None) -> Runner:
        """The runner for a study's experiments (`image` when the kind `needs_image`)."""
        raise NotImplementedError(f"runner kind {self.name!r} does not build a runner")

    def check_image(self, reference: str) -> str:
        """`reference` if it names an image this kind can run, else a `ValueError` saying
        what one looks like (raised at the study's line by the schema)."""
        raise ValueError(f"the {self.name} runner runs no image")

    def resolve_image(self, reference: str, study_dir: Path) -> str:
        """What a study's `reference` names from its folder (a file kind: an absolute
        path); a registry reference is itself."""
        return reference

    async def missing_images(
        self, images: Sequence[str], *, study_dir: Path | None = None
    ) -> list[str]:
        """Those of `images` that are not on this host's engine (kinds that need one)."""
        return []

    def missing_image_error(self, image: str) -> LlemError:
        """The error for an image this kind would run that is not here, with how to get it."""
        return ImageError(
            f"image {image!r} is not present for the {self.name} runner and the study has "
            "no `build:` context",
            fix_suggestion="Make the image available on this host, then run again.",
        )

    async def build_image(
        self, image: str, build: ImageBuild, *, output: Callable[[str], None] = print
    ) -> None:
        """Build `image` from `build` on this kind's own engine."""
        raise ConfigError(
            f"the {self.name} runner cannot build images (`build:` is for kinds that do)",
            fix_suggestion="Drop `build:` and make the image available yourself.",
        )

    async def ensure_image(
        self,
        image: str,
        *,
        build: ImageBuild | None,
        study_dir: Path,
        output: Callable[[str], None] = print,
    ) -> bool:
        """Before anything runs: `image` is here, or is built from `build`; True if built.

        Without a `build:` a missing image is refused (`missing_image_error`).
        """
        if not await self.missing_images([image], study_dir=study_dir):
            return False
        if build is None:
            raise self.missing_image_error(image)
        await self.build_image(image, build, output=output)
        return True

    async def reap(
        self,
        *,
        results_dir: Path | None = None,
        logs_dir: Path | None = None,
        dry_run: bool = False,
        study_over: bool = False,
        engine_url: str | None = None,
        api_deadlines: Mapping[str, float] | None = None,
    ) -> list[ReapedContainer]:
        """Remove what crashed runs of this kind left (kinds that are `reapable`)."""
        return []

    def describe_launch(
        self, runner: Runner, exchange: ExchangeDir, gpu_ids: Sequence[str], *, config_hash: str
    ) -> tuple[str, Any] | None:
        """For --dry-run: a title and what the runner would start for one experiment."""
        describe = getattr(runner, "describe_launch", None)
        if describe is None:
            return None
        title, body = describe(exchange, gpu_ids, config_hash=config_hash)
        return str(title), body

    async def check_study(self, options: RunnerOptions, images: Sequence[str]) -> None:
        """Before anything runs: raise a `ConfigError` for what would fail in every run."""

    async def doctor_checks(
        self, images: Sequence[str] = (), *, required: bool = True, buildable: bool = False
    ) -> list[DoctorCheck]:
        """`doctor`'s lines for this kind on this host (and `images` it would run).

        `required`: a study (or nothing else) needs this kind, so a failure fails.
        """
        ok = self.available()
        return [
            DoctorCheck(
                f"runner {self.name}",
                ok,
                "available" if ok else "not available here",
                optional=not required,
            )
        ]


#: name -> a RunnerKind subclass, or its dotted path ("package.module:Class").
_registry: dict[str, type[RunnerKind] | str] = dict(known_runner_kinds)
#: What each name's entry came from (a distribution, for kinds from entry points).
_origins: dict[str, str] = dict.fromkeys(known_runner_kinds, "built-in")
_instances: dict[str, RunnerKind] = {}

#: A read-only view of the registry: name -> class or dotted path, as registered.
runner_kinds: Mapping[str, type[RunnerKind] | str] = MappingProxyType(_registry)


def register_runner_kind(
    name: str,
    cls: type[RunnerKind] | str,
    *,
    clobber: bool = False,
    origin: str = "registered",
) -> None:
    """Register a runner kind under `name`: a `RunnerKind` subclass or its dotted path.

    A dotted path ("package.module:Class" or "package.module.Class") is imported
    on first use. Registering a name again raises unless `clobber=True`.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name == AUTO:
        raise ValueError(f"{name!r} cannot name a runner kind (letters, digits, '_', '-')")
    if name in _registry and not clobber:
        raise ValueError(f"runner kind {name!r} is already registered ({_registry[name]!r})")
    _registry[name] = cls
    _origins[name] = origin
    _instances.pop(name, None)


@functools.cache
def _load_entry_points() -> None:
    """Register the kinds other packages declare (once; a built-in name is not replaced)."""
    for point in entry_points(group=ENTRY_POINT_GROUP):
        origin = point.dist.name if point.dist is not None else "entry point"
        if point.name in _registry:
            log.warning(
                "runner_kind_shadowed",
                kind=point.name,
                ignored=f"{point.value} (from {origin})",
                kept=f"{_registry[point.name]!r} (from {_origins[point.name]})",
            )
            continue
        try:
            register_runner_kind(point.name, point.value, origin=origin)
        except ValueError as exc:
            log.warning("runner_kind_ignored", kind=point.name, origin=origin, reason=str(exc))


def registered_names() -> list[str]:
    """Every registered kind's name, sorted (entry points included)."""
    _load_entry_points()
    return sorted(_registry)


def kind_origin(name: str) -> str:
    """Where a kind came from: 'built-in', a distribution's name, or 'registered'."""
    _load_entry_points()
    return _origins.get(name, "registered")


def _import(path: str) -> type[RunnerKind]:
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    obj = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(obj, type) and issubclass(obj, RunnerKind)):
        raise TypeError(f"{path} is not a RunnerKind subclass")
    return obj


def unknown_kind_message(name: str) -> str:
    """ "unknown runner kind 'X'; did you mean 'Y'? (registered kinds: ...; or auto)"."""
    names = registered_names()
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown runner kind {name!r}{hint} (registered kinds: {', '.join(names)}; or auto)"


def get_runner_kind(name: str) -> RunnerKind:
    """The kind registered under `name` (imported on first use), or a `ConfigError`."""
    if name in _instances:
        return _instances[name]
    if name == AUTO:
        raise ConfigError(
            "`auto` is a choice rule, not a runner kind: it names no kind until decided",
            fix_suggestion="Decide it first (`choose_auto`), or name a kind.",
        )
    _load_entry_points()
    if name not in _registry:
        raise ConfigError(
            unknown_kind_message(name),
            fix_suggestion="Use one of the registered kinds, or `auto`; a kind from another "
            f"package needs that package installed (entry points {ENTRY_POINT_GROUP!r}).",
        )
    entry = _registry[name]
    try:
        cls = _import(entry) if isinstance(entry, str) else entry
    except (ImportError, AttributeError, TypeError) as exc:
        raise ConfigError(
            f"runner kind {name!r} ({entry}, from {_origins[name]}) cannot be loaded: {exc}",
            fix_suggestion="Install what that kind needs, or choose another with --runner.",
        ) from exc
    kind = _instances[name] = cls(name)
    return kind


def find_runner_kind(name: str) -> RunnerKind | None:
    """The kind registered under `name`, or None when no kind has that name."""
    return get_runner_kind(name) if name in registered_names() else None


def parse_runner_value(value: str) -> tuple[str, str | None]:
    """'NAME' | 'NAME:IMAGE' | 'auto' -> (kind name or 'auto', image or None).

    Raises `ValueError` (unknown kinds with a did-you-mean; an image given to a
    kind that runs none); the image reference itself is the caller's to check.
    """
    text = value.strip()
    if text == AUTO:
        return AUTO, None
    name, colon, image = text.partition(":")
    if name not in registered_names():
        raise ValueError(unknown_kind_message(name))
    if not colon:
        return name, None
    if not get_runner_kind(name).needs_image:
        raise ValueError(f"the {name} runner runs no image (NAME:IMAGE is for kinds that do)")
    return name, image


def choose_auto(
    *, has_image: bool, probe: Callable[[RunnerKind], bool] | None = None, quiet: bool = False
) -> RunnerKind:
    """The auto rule: the first kind of `AUTO_ORDER` the study's needs meet and that answers.

    `probe` replaces `available()` for the kinds that need an engine (tests, a
    cluster node's answer). Falling back past a kind is said in one warning.
    """
    passed: list[str] = []
    for name in AUTO_ORDER:
        kind = get_runner_kind(name)
        if kind.needs_engine and not (kind.available() if probe is None else probe(kind)):
            passed.append(f"No {kind.engine} reachable")
        elif kind.needs_image and not has_image:
            passed.append(f"The study names no image for the {name} runner")
        else:
            if passed and not quiet:
                log.warning(
                    "runner_fallback",
                    message=f"{passed[0]}: falling back to {kind.summary or kind.name}.",
                )
            return kind
    raise ConfigError(
        "no runner kind of the auto rule is available here",
        fix_suggestion="Choose a kind with --runner.",
    )


def kinds_for(value: str) -> list[RunnerKind]:
    """The kinds a runner value may become: itself, or under `auto` the rule's, in order."""
    names = AUTO_ORDER if value == AUTO else (value,)
    return [get_runner_kind(name) for name in names]


def decide_kind(
    value: str,
    *,
    has_image: bool,
    probe: Callable[[RunnerKind], bool] | None = None,
    quiet: bool = False,
) -> RunnerKind:
    """The kind a runner value means on a host: itself, or the auto rule's choice there."""
    if value == AUTO:
        return choose_auto(has_image=has_image, probe=probe, quiet=quiet)
    return get_runner_kind(value)
