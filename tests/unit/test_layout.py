"""The package's layout keeps its promises: modules import each other without cycles, no module
imports another's private names, every module says what it is for, none grows past a size a
reader can hold (about 500 lines), and `import mediator` imports none of the optional extras."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "src" / "mediator"
MODULES = sorted(PACKAGE.rglob("*.py"))  # subpackages (mediator.ray) too
MAX_LINES = 520


def _runtime_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of the package-relative imports run when `path` is imported: top-level
    ones outside `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [alias.name for alias in node.names]
            if node.module is None:  # from . import _x, _y
                found.extend((name, []) for name in names)
            else:
                found.append((node.module, names))
    return found


def _graph() -> dict[str, set[str]]:
    return {
        path.stem: {module for module, _ in _runtime_imports(path)}
        for path in MODULES
        if path.parent == PACKAGE
    }


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                cycle = path[path.index(imported) :] + [imported]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if imported not in state:
                visit(imported)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_imported_across_modules(path: Path) -> None:
    private = [
        f"{module}.{name}"
        for module, names in _runtime_imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == [], f"{path.name} imports private names of other modules: {private}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_says_what_it_is_for(path: Path) -> None:
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc and len(doc.split()) >= 8, f"{path.name} needs a docstring saying what it is for"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines: split it by job"


EXTRAS = ("transformers", "accelerate", "tokenizers", "ray", "matplotlib")


def test_import_mediator_imports_no_extra() -> None:
    probe = f"import sys, mediator; print([m for m in {EXTRAS!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"import mediator imported {done.stdout.strip()}"
