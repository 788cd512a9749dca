"""The package's import graph: imports point down the layers, no cycles, no private reach-ins.

A small AST walk over src/llem_dispatch (no dependency): every `import`/`from`
of a llem_dispatch module, at any depth (lazy imports inside functions count
too, except those under `if TYPE_CHECKING:`).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "llem_dispatch"

#: Bottom to top. A module may import its own layer or any layer below it.
LAYERS: list[set[str]] = [
    {"errors", "models", "container", "_deadlines", "_sizes", "_engine", "_stderr_text"},
    {"_labels", "_logging", "_logcapture", "_exchange", "_docker", "_cdi"},
    {"gpu"},
    {"runners", "reap", "testing"},
    {"dispatch"},
    {"cluster", "slurm"},
    {"study"},
    {"report"},
    {"cli", "__main__"},
]


def _unit(module: str) -> str:
    """The layer unit of a dotted module name: its first component under llem_dispatch."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"module unit {unit!r} is in no layer: add it to LAYERS")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _imports(path: Path) -> Iterator[tuple[str, str, int]]:
    """(imported module, imported name or '', line) for each llem_dispatch import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llem_dispatch"):
                    yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if not base.startswith("llem_dispatch"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*candidate.split("."))
                ).is_dir():
                    yield candidate, "", node.lineno
                else:
                    yield base, alias.name, node.lineno


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _edges() -> list[tuple[str, str, str, int]]:
    """(importer, imported module, name, line) across the package."""
    return [
        (_module_name(path), target, name, line)
        for path in _sources()
        for target, name, line in _imports(path)
    ]


def test_every_module_is_in_a_layer() -> None:
    for path in _sources():
        module = _module_name(path)
        if module != "llem_dispatch":
            _layer(_unit(module))


def test_imports_point_down() -> None:
    upward = []
    for importer, target, _, line in _edges():
        if importer == "llem_dispatch":
            continue  # the lazy top-level __init__ re-exports from every layer
        if _layer(_unit(target)) > _layer(_unit(importer)):
            upward.append(f"{importer}:{line} imports {target} (a higher layer)")
    assert not upward, "\n".join(upward)


def test_placements_do_not_import_each_other() -> None:
    """Slurm's job needs nothing of Ray's: what both use (error payloads, the GPUs a
    task holds) lives below them."""
    crossing = [
        f"{importer}:{line} imports {target}"
        for importer, target, _, line in _edges()
        if {_unit(importer), _unit(target)} == {"cluster", "slurm"}
    ]
    assert crossing == []


def test_no_private_names_across_packages() -> None:
    reach_ins = []
    for importer, target, name, line in _edges():
        same_unit = _unit(importer) == _unit(target)
        private_module = any(p.startswith("_") for p in target.split(".")[2:])
        if not same_unit and (private_module or name.startswith("_")):
            reach_ins.append(f"{importer}:{line} imports {target} {name}".rstrip())
    assert not reach_ins, "\n".join(reach_ins)


def test_no_import_cycles_between_modules() -> None:
    graph: dict[str, set[str]] = {}
    for importer, target, _, _ in _edges():
        if importer not in (target, "llem_dispatch"):
            graph.setdefault(importer, set()).add(target)
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package's __init__ importing its own submodules is how packages export.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if state.get(nxt) is None and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize(
    ("graph", "cyclic"),
    [
        ({"a": {"b"}, "b": {"c"}}, False),
        ({"a": {"b"}, "b": {"a"}}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
        ({"p": {"p.x"}, "p.x": {"q"}}, False),
    ],
)
def test_cycle_finder_finds_cycles(graph: dict[str, set[str]], cyclic: bool) -> None:
    assert (_find_cycle(graph) is not None) is cyclic


def test_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    # The check itself can fail: a runner module importing study is upward.
    assert _layer(_unit("llem_dispatch.study.run")) > _layer(_unit("llem_dispatch.runners.docker"))


#: The modules that may name runner kinds: the registry and the kinds themselves.
KIND_MODULES = {
    "llem_dispatch.runners.kinds",
    "llem_dispatch.runners.local",
    "llem_dispatch.runners.docker_kind",
    "llem_dispatch.runners.podman_kind",
}
#: Other modules whose literals happen to equal a kind's name, and why that is no kind.
KIND_NAME_ALLOWED = {
    "llem_dispatch.cluster.connection": "Ray's own address 'local' (start a local Ray)",
}


def _kind_name_comparisons(tree: ast.AST, names: set[str]) -> Iterator[int]:
    """Lines comparing something with a kind name: `==`/`!=`/`in {...}`, or `case "docker":`."""

    def named(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, ast.Set | ast.List | ast.Tuple):
            return any(named(item) for item in node.elts)
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        else:
            continue
        if any(named(operand) for operand in operands):
            yield node.lineno


def test_no_kind_name_comparisons_outside_the_registry() -> None:
    from llem_dispatch.runners.kinds import known_runner_kinds

    names = set(known_runner_kinds)
    assert {"local", "docker"} <= names
    found = [
        f"{_module_name(path)}:{line} compares with a runner kind's name: ask the registry"
        for path in _sources()
        # The kinds' own modules need no comparison either: each is its own class.
        if _module_name(path) not in {"llem_dispatch.runners.kinds", *KIND_NAME_ALLOWED}
        for line in _kind_name_comparisons(ast.parse(path.read_text()), names)
    ]
    assert not found, "\n".join(found)


def test_kind_name_check_catches_each_form() -> None:
    names = {"local", "docker"}
    source = """
if spec.kind == "docker":
    pass
use = kind != 'local'
ok = value in {"local", "auto"}
also = value not in ("docker",)
match kind:
    case "local":
        pass
fine = kind == "auto" or f("docker") or {"docker": 1}
"""
    assert list(_kind_name_comparisons(ast.parse(source), names)) == [2, 4, 5, 6, 8]


def _placement_name_comparisons(tree: ast.AST) -> Iterator[int]:
    """Lines comparing something named `placement` (or `.placement`) with a string literal."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        named = any(
            (isinstance(s, ast.Attribute) and s.attr == "placement")
            or (isinstance(s, ast.Name) and s.id == "placement")
            for s in sides
        )
        literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides)
        if named and literal:
            yield node.lineno


def test_no_module_branches_on_a_placement_name() -> None:
    # A placement is chosen once by name (dispatch.registry); everyone else calls its hooks.
    found = [
        f"{_module_name(path)}:{line}"
        for path in _sources()
        for line in _placement_name_comparisons(ast.parse(path.read_text()))
    ]
    assert found == []


def test_the_placement_name_check_can_fail() -> None:
    tree = ast.parse('if study.placement == "ray":\n    pass\nok = placement is None\n')
    assert list(_placement_name_comparisons(tree)) == [1]


#: Modules whose literals happen to equal a placement's name, and why that is no placement.
PLACEMENT_NAME_ALLOWED = {
    **dict.fromkeys(KIND_MODULES, "the runner kind 'local' (a kind's name, not a placement's)"),
    "llem_dispatch.cluster.connection": "Ray's own address 'local' (start a local Ray)",
}


def _placement_name_literals(tree: ast.AST, names: set[str]) -> Iterator[int]:
    """Lines comparing with a placement's name, or passing one to `on_placement`."""
    yield from _kind_name_comparisons(tree, names)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in {"on_placement", "placement_class", "placement_settings_model"}
            and any(isinstance(a, ast.Constant) and a.value in names for a in node.args)
        ):
            yield node.lineno


def test_no_placement_name_outside_the_registry_and_its_own_package() -> None:
    from llem_dispatch.dispatch.registry import known_placements

    # Each built-in placement's home: the package of its class (Ray's `cluster`).
    homes = {
        name: entry.path.partition(":")[0].rpartition(".")[0]
        for name, entry in known_placements.items()
    }
    assert {"local", "ray", "slurm"} <= set(homes)
    found = []
    for path in _sources():
        module = _module_name(path)
        if module == "llem_dispatch.dispatch.registry" or module in PLACEMENT_NAME_ALLOWED:
            continue
        names = {n for n, home in homes.items() if not module.startswith(home + ".")}
        found += [
            f"{module}:{line} names a placement: ask the registry (or the placement)"
            for line in _placement_name_literals(ast.parse(path.read_text()), names)
        ]
    assert not found, "\n".join(found)


def test_the_placement_literal_check_catches_each_form() -> None:
    source = """
if value != "ray":
    pass
study.on_placement("ray", {"address": a})
placement_class("slurm")
fine = {"ray": 1} or f("ray") or value == "auto"
"""
    assert list(_placement_name_literals(ast.parse(source), {"ray", "slurm"})) == [2, 4, 5]


@pytest.mark.parametrize(
    "module", ["llem_dispatch", "llem_dispatch.testing", "llem_dispatch.study.loading"]
)
def test_importing_pays_for_no_docker_client(module: str) -> None:
    # aiodocker + aiohttp cost about half a second to import: the package and
    # the FakeRunner must not load them; only DockerRunner's first use does.
    # A fresh interpreter, since this test process has imported them already.
    probe = (
        f"import sys, {module}\n"
        "loaded = sorted(m for m in ('aiodocker', 'aiohttp') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "from llem_dispatch.runners import DockerRunner\n"
        "assert DockerRunner.__module__ == 'llem_dispatch.runners.docker'\n"
        "assert 'aiodocker' in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


#: The container edge: the only modules that may talk to a Docker Engine API (aiodocker,
#: `_docker`, the container runner and reaper), each kind's own or below the kinds.
CONTAINER_EDGE = {
    "llem_dispatch._docker": "the Docker edge: URL, probe, images, API error mapping",
    "llem_dispatch.reap": "removes labelled containers through an engine's API",
    "llem_dispatch.runners.docker": "the container runner (one engine object: Docker or Podman)",
    "llem_dispatch.runners._container_run": "one container's run, for that runner",
    "llem_dispatch.runners.docker_kind": "the docker kind",
    "llem_dispatch.runners.podman_kind": "the podman kind",
    "llem_dispatch.runners.podman": "PodmanRunner, for library use",
    # PEP 562 lazy exports: `DockerRunner` is imported on first attribute access only.
    "llem_dispatch": "lazy public export",
    "llem_dispatch.runners": "lazy public export",
}
_CONTAINER_TARGETS = (
    "llem_dispatch._docker",
    "llem_dispatch.reap",
    "llem_dispatch.runners.docker",
    "llem_dispatch.runners._container_run",
    "llem_dispatch.runners.podman",
)


def _docker_calls(path: Path) -> Iterator[tuple[str, int]]:
    """(what, line) for each import of aiodocker/aiohttp or of a container-edge module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        )
        for name in names:
            if name.split(".")[0] in {"aiodocker", "aiohttp"} or name in _CONTAINER_TARGETS:
                yield name, node.lineno
                break
    if path.is_relative_to(PACKAGE):  # relative imports, resolved
        for target, _, line in _imports(path):
            if target in _CONTAINER_TARGETS:
                yield target, line


def test_no_docker_call_outside_the_kinds_and_the_container_edge() -> None:
    """Nothing else asks a Docker engine: the CLI, study, placements and nodes go
    through a kind (`RunnerKind`: its images, reaping, doctor lines)."""
    found = sorted(
        {
            f"{_module_name(path)}:{line} imports {what}: ask the runner kind instead"
            for path in _sources()
            if _module_name(path) not in CONTAINER_EDGE
            for what, line in _docker_calls(path)
        }
    )
    assert not found, "\n".join(found)


def test_the_docker_call_check_can_fail(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import aiodocker\n"
        "def f():\n    from llem_dispatch._docker import image_present\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from llem_dispatch.reap import ReapedContainer\n"
    )
    assert [line for _, line in _docker_calls(sample)] == [1, 3]


def test_loading_a_study_with_an_image_pays_for_no_docker_client(tmp_path: Path) -> None:
    # Its image reference is checked by the kinds that would run it (Docker's under
    # auto), which costs no Docker client: that comes only once an engine is asked.
    study = tmp_path / "study.yaml"
    study.write_text("image: llem-test/busybox:latest\ncommand: ['true']\ngrid: {x: [1]}\n")
    probe = (
        "import sys\n"
        "from llem_dispatch.study.loading import load_study\n"
        f"assert load_study({str(study)!r}).image == 'llem-test/busybox:latest'\n"
        "loaded = sorted(m for m in ('aiodocker', 'aiohttp') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


#: A module says what it owns in its first lines and stays readable whole; a function
#: fits on a screen or two.
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _oversized(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            found.append(f"{path.relative_to(root)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {length}")
    return found


def test_no_module_over_600_lines_and_no_function_over_80() -> None:
    assert _oversized(PACKAGE) == []


def test_the_size_check_can_fail(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "big.py").write_text(f"def long():\n{body}\n" + "\n" * MAX_MODULE_LINES)
    assert [line.split(":")[0] for line in _oversized(tmp_path)] == ["big.py", "big.py"]
