"""The package's import graph (module-level and function-level imports alike) has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import learned_opt

ROOT = Path(learned_opt.__file__).parent
PACKAGE = ROOT.name


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules an ``import`` / ``from ... import`` names (a from-import of a
    submodule counts as that submodule, else as the module it reads from)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parent = module.split(".") if is_package else module.split(".")[:-1]
            parent = parent[: len(parent) - node.level + 1]
            base = ".".join([*parent, base] if base else parent)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    else:
        return set()
    found = set()
    for name in names:
        while name and name not in modules:  # `import a.b.c` of a non-module attribute: its module
            name = name.rpartition(".")[0]
        if name.split(".")[0] == PACKAGE:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source (parents' ``__init__``
    executed on the way are not counted: a package importing its own submodule is not a cycle)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps: set[str] = set()
        for node in ast.walk(tree):
            deps |= _imported(node, module, path.name == "__init__.py", modules)
        graph[module] = deps - {module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    graph = {"learned_opt.a": {"learned_opt.b"}, "learned_opt.b": {"learned_opt.a"}, "learned_opt.c": set()}
    assert find_cycles(graph) == [["learned_opt.a", "learned_opt.b"]]
    modules = {"learned_opt", "learned_opt.x", "learned_opt.x.y", "learned_opt.z"}
    inner = ast.parse("def f():\n    from learned_opt.x import y\n    from ..z import thing\n")
    found = set()
    for node in ast.walk(inner):
        found |= _imported(node, "learned_opt.x.w", False, modules)
    assert found == {"learned_opt.x.y", "learned_opt.z"}


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in learned_opt/: " + "; ".join(" <-> ".join(c) for c in cycles)
