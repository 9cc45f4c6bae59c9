"""The house rules, enforced: ruff (lint and format), mypy --strict on the three packages,
and the import layers (``gateway`` -> ``policies`` -> ``backends``, nothing upward).

They run with the suite, so ``.ci/run`` (the README's test command) fails on them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("gateway", "policies", "backends")
# what each layer may import from the project (itself included)
ALLOWED = {
    "backends": {"backends"},
    "policies": {"policies", "backends"},
    "gateway": {"gateway", "policies", "backends"},
}


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is part of the test extra: pip install -e '.[test]'"
    return found


def test_ruff_lint_and_format_are_clean() -> None:
    ruff = _tool("ruff")
    lint = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = subprocess.run([ruff, "format", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


@pytest.mark.slow  # a cold type check of every module
def test_mypy_strict_passes_on_the_packages() -> None:
    result = subprocess.run(
        [_tool("mypy")], cwd=REPO, capture_output=True, text=True, timeout=300
    )  # [tool.mypy] in pyproject.toml: strict, the three packages
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def _imports(path: Path, module: str) -> Iterator[tuple[str, int, bool]]:
    """``(imported module, line, eager)``: eager means executed at import time (not in a
    function, not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(node: ast.AST, eager: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from walk(child, False)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(child, False)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, eager
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                yield base, child.lineno, eager
            else:
                yield from walk(child, eager)

    yield from walk(tree, True)


def test_imports_only_go_down_the_layers() -> None:
    upward = []
    for module, path in _modules():
        layer = module.split(".")[0]
        for imported, line, _ in _imports(path, module):
            top = imported.split(".")[0]
            if top in PACKAGES and top not in ALLOWED[layer]:
                upward.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {imported}")
    assert not upward, "\n".join(upward)


def _eager_graph(*, eager_only: bool = True) -> dict[str, set[str]]:
    """Module -> the project modules it executes at import time (``eager_only``), or
    that it names anywhere, for types too. Importing ``a.b.c`` runs ``a/__init__`` and
    ``a/b/__init__`` first, so those are edges too -- except a module's own ancestor
    packages, which Python has always started importing before it."""
    modules = dict(_modules())
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        parts_of_module = module.split(".")
        ancestors = {".".join(parts_of_module[:n]) for n in range(1, len(parts_of_module))}
        deps: set[str] = set()
        for imported, _, eager in _imports(path, module):
            parts = imported.split(".")
            if (eager_only and not eager) or parts[0] not in PACKAGES:
                continue
            for n in range(1, len(parts) + 1):
                target = ".".join(parts[:n])
                if target in modules and target != module and target not in ancestors:
                    deps.add(target)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = _pop_component(stack, on_stack, node)
                    if len(component) > 1:
                        found.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def _pop_component(stack: list[str], on_stack: set[str], root: str) -> list[str]:
    component = []
    while True:
        top = stack.pop()
        on_stack.discard(top)
        component.append(top)
        if top == root:
            return sorted(component)


def test_no_module_import_cycle() -> None:
    """No module needs another that needs it back at import time (a lazy import inside a
    function or under ``TYPE_CHECKING`` is not executed then)."""
    assert _cycles(_eager_graph()) == []


def test_no_cycle_even_through_type_only_or_lazy_imports() -> None:
    """The stricter rule: not even the imports made for types (``TYPE_CHECKING``) or
    inside functions close a circle -- the request path is a line, state to pool to
    exchange to dispatch, with nothing pointing back."""
    assert _cycles(_eager_graph(eager_only=False)) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
