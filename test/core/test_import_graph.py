"""The project's modules import each other without circles.

Why: a circle (a imports b, b imports a, often hidden in a function-level import) means neither module can be read,
tested or moved without the other, and the order of first imports decides whether it works at all. This reads every
module of refinevla_core with `ast`, collects every import of another project module (module level, inside functions
and classes; `if TYPE_CHECKING:` blocks are left out: they never run), and fails on each strongly connected component,
naming its modules and the imports that close it. Lazy imports of third-party libraries are not edges: only project
modules count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "refinevla_core"


def project_modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under `if TYPE_CHECKING:` (imports for annotations only)."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _imported_names(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
    return [f"{source}.{alias.name}" for alias in node.names] + [source]


def import_graph(modules: dict[str, Path], package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            names = _imported_names(node, module, path.name == "__init__.py")
            for name in names:
                target = resolve(name) if name.split(".")[0] == package else None
                if target is not None:
                    if target != module:
                        edges.setdefault(target, node.lineno)
                    break
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start, targets in graph.items():
        if start in index:
            continue
        work = [(start, iter(targets))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, {}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    found.append(sorted(component))
    return found


def describe_cycles(graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    lines = []
    for component in strongly_connected(graph):
        lines.append(f"circle of {len(component)} modules: {', '.join(component)}")
        for module in component:
            for target, line in sorted(graph[module].items()):
                if target in component:
                    lines.append(f"    {modules[module].relative_to(ROOT)}:{line} imports {target}")
    return "\n".join(lines)


def test_no_project_module_imports_itself_through_a_circle():
    modules = project_modules()
    report = describe_cycles(import_graph(modules), modules)
    assert not report, "import circles (move the shared part to a lower module):\n" + report


@pytest.mark.parametrize("function_level", [False, True])
def test_the_check_finds_a_circle_at_module_and_function_level(tmp_path, function_level):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("import numpy\nfrom pkg.sub import b\n")
    body = "def f():\n    from pkg import a\n" if function_level else "from . import a\n"
    (package / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.c\n"
                                          + body.replace("from . import a", "from .. import a"))
    (package / "c.py").write_text("from pkg.sub.b import f\n")
    modules = project_modules(tmp_path, "pkg")
    graph = import_graph(modules, "pkg")
    assert strongly_connected(graph) == [["pkg.a", "pkg.sub.b"]]  # the TYPE_CHECKING import closes no circle
    assert graph["pkg.a"] == {"pkg.sub.b": 2}
