"""The shape of `streamer/` and `pipelines/`: no import cycles, no private names across modules, and the runtime
package never importing the offline one.

Before: `pipelines.train_heads` and `pipelines.voice_recipes` imported each other (one side inside a function) and
`voice_recipes` reached for `train_heads._rel`, `fusion_recipes` for `voice_recipes._torch`. A cycle makes a module
impossible to read or test alone, and a private name used elsewhere is an interface nobody agreed to keep.

The graph is read from the source with `ast` (nothing is imported): every `import` and `from … import`, at module
level and inside functions alike (a function-level import is a cycle that waits for its first call), with relative
imports resolved. Imports under `if TYPE_CHECKING:` are skipped: they never run.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("streamer", "pipelines")


@dataclass(frozen=True)
class Import:
    """One import statement's effect: `module` imports `target` (a module of these packages), at `line`; `names`
    are the names it takes from `target` (empty for `import target`)."""

    module: str
    target: str
    line: int
    names: tuple[str, ...] = ()


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def find_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted name → file, for every module of `packages` under `root`."""
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str:
    """The absolute module a `from … import` reads from (`from . import x` inside `a.b.c` → `a.b`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, modules):
        base = base[:-1]  # a plain module's `.` is its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def imports_of(module: str, source: str, modules: dict[str, Path]) -> list[Import]:
    """Every import of a module of `modules` made by `module` (whose code is `source`), wherever it stands."""
    tree = ast.parse(source)
    skipped = _type_checking_only(tree)
    found: list[Import] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                known = [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules]
                if known:
                    found.append(Import(module, known[0], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            source_module = _resolve(module, node, modules)
            if source_module not in modules:
                continue
            plain = []
            for alias in node.names:
                sub = f"{source_module}.{alias.name}"
                if sub in modules:  # `from pkg import submodule`
                    found.append(Import(module, sub, node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                found.append(Import(module, source_module, node.lineno, tuple(plain)))
    return found


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[Import]:
    modules = find_modules(root, packages)
    return [imp for name, path in modules.items() for imp in imports_of(name, path.read_text(), modules)]


def find_cycles(edges: list[Import]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected component that has one:
    Tarjan's algorithm, iterative so that a long chain cannot exhaust the recursion limit."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.module != e.target:
            graph.setdefault(e.module, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle in component {component}")


def _describe(cycle: list[str], edges: list[Import]) -> str:
    """`a (line 3) → b (line 10) → a`: each module with the line of its import of the next one."""
    lines = {(e.module, e.target): e.line for e in edges}
    return " → ".join([*(f"{a} (line {lines[a, b]})" for a, b in itertools.pairwise(cycle)), cycle[-1]])


def private_imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """`from other import _name`, `import other._module`, and `alias._name` where `alias` is another module of
    these packages bound by an import: each a place that leans on another module's internals."""
    modules = find_modules(root, packages)
    found = []
    for name, path in modules.items():
        source = path.read_text()
        edges = imports_of(name, source, modules)
        for e in edges:
            if e.target == name:
                continue
            found += [f"{name}:{e.line} imports {e.target}.{n}" for n in e.names if _private(n)]
            if any(_private(part) for part in e.target.split(".")):
                found.append(f"{name}:{e.line} imports {e.target}")
        found += _private_attributes(name, source, modules)
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_attributes(module: str, source: str, modules: dict[str, Path]) -> list[str]:
    """`V._torch()` after `from pipelines import voice_recipes as V` (or `import a.b as V`)."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in modules:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node, modules)
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
    return [
        f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and aliases[node.value.id] != module
        and _private(node.attr)
    ]


# --------------------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def edges() -> list[Import]:
    return import_graph(REPO)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str, edges: list[Import]) -> None:
    """Module-level and function-level imports alike: a cycle through a function-level import still means neither
    module can be understood, moved or tested without the other."""
    cycles = [c for c in find_cycles(edges) if any(m.split(".")[0] == package for m in c)]
    assert not cycles, f"import cycles in {package}/:\n" + "\n".join(_describe(c, edges) for c in cycles)


def test_no_private_names_across_modules() -> None:
    """A name another module needs is public where it lives (or moves to where it belongs)."""
    found = private_imports(REPO)
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_runtime_never_imports_the_offline_pipelines(edges: list[Import]) -> None:
    """`streamer` is what users install and run; `pipelines` (training, benchmarks) needs scikit-learn, torch and
    the data, which the runtime must not."""
    found = [
        f"{e.module}:{e.line} imports {e.target}"
        for e in edges
        if e.module.startswith("streamer") and e.target.startswith("pipelines")
    ]
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------- the checks themselves


def _package(tmp_path: Path, **modules: str) -> Path:
    """A `pipelines` package under `tmp_path`: module `train.heads` → pipelines/train/heads.py, with its __init__s."""
    for name, text in {"__init__": "", **modules}.items():
        path = tmp_path.joinpath("pipelines", *name.split(".")).with_suffix(".py")
        for parent in [path.parent, *path.parent.parents][: len(name.split("."))]:
            parent.mkdir(parents=True, exist_ok=True)
            (parent / "__init__.py").touch()
        path.write_text(text)
    return tmp_path


def test_a_cycle_through_a_function_level_relative_import_is_found(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        **{
            "train.heads": "from pipelines.train.linear import fit\n",
            "train.linear": "def fit():\n    from .voice import run\n",
            "train.voice": "from . import heads\n\ndef run(): ...\n",
        },
    )
    edges = import_graph(root, ("pipelines",))
    cycles = find_cycles(edges)
    assert cycles == [
        ["pipelines.train.heads", "pipelines.train.linear", "pipelines.train.voice", "pipelines.train.heads"]
    ]
    assert "pipelines.train.linear (line 2)" in _describe(cycles[0], edges)


def test_imports_that_never_run_or_point_outside_make_no_cycle(tmp_path: Path) -> None:
    b = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipelines.a import X\n"
    root = _package(tmp_path, a="import numpy\nfrom pipelines import b\n", b=b)
    assert find_cycles(import_graph(root, ("pipelines",))) == []


def test_private_names_are_found_however_they_are_reached(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        a="def _rel(): ...\ndef _torch(): ...\n__all__ = []\n",
        b="from pipelines.a import _rel, __all__\n",
        c="from pipelines import a as V\n\n\ndef f():\n    return V._torch(), _own()\n",
    )
    assert private_imports(root, ("pipelines",)) == [
        "pipelines.b:1 imports pipelines.a._rel",
        "pipelines.c:5 uses pipelines.a._torch",
    ]
