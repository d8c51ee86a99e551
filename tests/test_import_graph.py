"""The package's modules import each other without a cycle, lazy imports included.

A cycle hidden by an import inside a function still couples the two modules both
ways; this test reads every import statement of the package, wherever it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

import esper.tamiyo.policy as package

ROOT = Path(package.__file__).parent
PACKAGE = package.__name__


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """The package modules `path` imports, at module level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                # `from package import submodule` imports the submodule; a name defined
                # in the package's `__init__` imports the `__init__`.
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import cycle among the package's modules, or `None`."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after

    def visit(name: str, stack: list[str]) -> list[str] | None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target, [*stack, target])):
                return found
        state[name] = "done"
        return None

    for name in sorted(GRAPH):
        if name not in state and (found := visit(name, [name])):
            return found
    return None


def test_the_graph_covers_the_package() -> None:
    assert f"{PACKAGE}.base" in GRAPH
    assert f"{PACKAGE}.checkpoint_writer" in GRAPH[f"{PACKAGE}.base"]
    assert f"{PACKAGE}.base" in GRAPH[f"{PACKAGE}.registry"]


def test_no_module_imports_itself_back() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check is not vacuous: a registry that imported the base's importer is caught."""
    GRAPH[f"{PACKAGE}.checkpoint_writer"].add(f"{PACKAGE}.registry")
    try:
        cycle = _cycle()
    finally:
        GRAPH[f"{PACKAGE}.checkpoint_writer"].discard(f"{PACKAGE}.registry")
    assert cycle is not None
    assert f"{PACKAGE}.base" in cycle
