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
    {"errors", "models", "container", "_deadlines", "_sizes"},
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
        if _module_name(path) not in KIND_MODULES | set(KIND_NAME_ALLOWED)
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
