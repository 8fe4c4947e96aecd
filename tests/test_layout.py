"""The tree shows the architecture: each folder of runner/ imports only the layers below it (imports
inside functions count), there is no import circle, and importing the core loads nothing heavy."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "runner"

# folder → the folders its modules may import (besides their own)
MAY_IMPORT = {
    "core": set(),
    "simulator": {"core"},
    "providers": {"core", "simulator"},  # the registry opens the in-process simulator
    "ledger": {"core"},
    "engine": {"core", "providers", "ledger"},
    "app": {"core", "providers", "ledger", "engine"},
    "cli": {"core", "providers", "ledger", "engine", "app", "simulator"},
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The runner modules `path` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("runner."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("runner"):
            found.add(node.module)
            # `from runner.core import money` imports the module runner.core.money
            for alias in node.names:
                candidate = PACKAGE.parent / Path(*node.module.split("."), alias.name)
                if candidate.with_suffix(".py").exists() or candidate.is_dir():
                    found.add(f"{node.module}.{alias.name}")
    return found


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else ""


def test_each_folder_imports_only_the_layers_below_it() -> None:
    wrong = []
    for module, imported in _graph().items():
        layer = _layer(module)
        if not layer:  # runner/__init__ and __main__: the package's doors
            continue
        allowed = MAY_IMPORT[layer] | {layer}
        wrong += [f"{module} imports {other}" for other in imported if _layer(other) not in allowed]
    assert wrong == []


def test_outside_the_ledger_only_its_public_surface_is_imported() -> None:
    inner = [
        f"{module} imports {other}"
        for module, imported in _graph().items()
        if not module.startswith("runner.ledger")
        for other in imported
        if other.startswith("runner.ledger.")
    ]
    assert inner == []


def test_no_sql_outside_the_ledger() -> None:
    statement = re.compile(r"\b(SELECT .* FROM|INSERT INTO|UPDATE \w+ SET|DELETE FROM|CREATE TABLE)\b")
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in PACKAGE.rglob("*.py")
        if "ledger" not in path.relative_to(PACKAGE).parts[:1]
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if statement.search(line)
    ]
    assert found == []


def test_no_import_circle() -> None:
    graph = {m: {i for i in imported if i != m} for m, imported in _graph().items()}
    graph = {m: {i for i in imported if i in graph} for m, imported in graph.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph[module]):
            if state.get(other) == 1:
                circles.append([*path[path.index(other) :], other])
            elif other not in state:
                visit(other, [*path, other])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package's __init__ importing its own submodules is no circle of design
    circles = [c for c in circles if not all(c[0].startswith(m) or m.startswith(c[0]) for m in c)]
    assert circles == []


@pytest.mark.parametrize("module", ["runner.core.money", "runner.core.models", "runner"])
def test_importing_the_core_loads_nothing_heavy(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('polars', 'aiohttp', 'sqlalchemy')"
        " or m.startswith(('runner.engine', 'runner.app', 'runner.ledger'))]\n"
        "print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
