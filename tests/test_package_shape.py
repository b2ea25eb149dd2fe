"""The package's shape: no import cycle (counting imports inside functions too)
and no module over 400 lines."""

from __future__ import annotations

import ast
import importlib.util
import os

import tokenmill

PACKAGE_DIR = os.path.dirname(tokenmill.__file__)


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(PACKAGE_DIR))
                name = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                found[name] = os.path.join(folder, f)
    return found


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules `name` imports; `from pkg import sub` counts as sub."""
    is_package = path.endswith("__init__.py")
    base = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = base.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1] + ([mod] if mod else []))
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in modules or _is_native_module(sub):
                    targets.add(sub)
                else:
                    targets.add(mod)
    return {t for t in targets if t in modules and t != name}


def _is_native_module(name: str) -> bool:
    """A compiled submodule (tokenmill._core): a leaf of the graph."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, AttributeError):  # an attribute of a module, not a submodule
        return False


def test_no_import_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 20  # the walk saw the package


def test_no_module_over_400_lines():
    long = {m: n for m, p in _modules().items() if (n := sum(1 for _ in open(p))) > 400}
    assert not long, long
