"""The package's shape: the product never imports test support, no module imports itself back, modules stay small.

Imports are read from the source (every ``import``, at module level or inside a function, except
those under ``if TYPE_CHECKING:``), so a lazy import that would close a circle counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hf_merge

PACKAGE_ROOT = Path(hf_merge.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE_ROOT.rglob("*.py") if "_resources" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def target(module: str) -> str | None:
        # The longest known module that the dotted name starts with.
        while module and module not in known:
            module = module.rpartition(".")[0]
        return module or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if (t := target(alias.name)) is not None:
                        found.add(t)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                for alias in child.names:
                    t = target(f"{module}.{alias.name}") if f"{module}.{alias.name}" in known else target(module)
                    if t is not None:
                        found.add(t)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def test_the_graph_is_read_from_real_imports():
    graph = _graph()
    # Spot checks that the reader sees module-level, relative and lazy imports.
    assert "hf_merge.hub.client" in graph["hf_merge.hub.sources"]
    assert "hf_merge.hub_server" in graph["hf_merge.demo"] or "hf_merge.hub_server.server" in graph["hf_merge.demo"]
    assert "hf_merge.testing.tiny_clip" in graph["hf_merge.testing.fixtures_models"]


def test_the_product_never_imports_test_support():
    graph = _graph()
    offenders = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if not module.startswith("hf_merge.testing")
        for target in targets
        if target.startswith("hf_merge.testing")
    )
    assert offenders == []


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_a_circle_is_found_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_stay_small():
    # A module past 400 lines holds more than one job (or data that belongs in a data file).
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    assert {name: lines for name, lines in sizes.items() if lines > 400} == {}
