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


# The layers, lowest first: a module may import its own layer and those below, never one above.
# hub_server, zoo and testing stand beside the layers (they may use any of them); of the layers,
# only the command line (and the demo it runs) imports them.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("hf_merge.errors", "hf_merge.log", "hf_merge.sizes", "hf_merge.resources", "hf_merge.progress",
                "hf_merge.declared")),
    ("io", ("hf_merge.io",)),
    ("hub", ("hf_merge.hub",)),
    ("merging", ("hf_merge.merging",)),
    ("evaluation", ("hf_merge.evaluation",)),
    ("publish", ("hf_merge.publish",)),
    ("config and api", ("hf_merge.recipe", "hf_merge.recipe_sections", "hf_merge.recipe_parameters",
                        "hf_merge.recipe_overrides", "hf_merge.step_evaluation", "hf_merge.output_folder", "hf_merge.api",
                        "hf_merge.resume", "hf_merge.continuation", "hf_merge.validation_scoring")),
    ("watch", ("hf_merge.watch",)),
    ("cli", ("hf_merge.cli", "hf_merge.demo")),
]
BESIDE = ("hf_merge.hub_server", "hf_merge.zoo", "hf_merge.testing")


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _layer(module: str) -> int | None:
    return next((i for i, (_, prefixes) in enumerate(LAYERS) if _within(module, prefixes)), None)


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    offenders = []
    for module, targets in sorted(graph.items()):
        here = _layer(module)
        if here is None:
            continue
        for target in sorted(targets):
            there = _layer(target)
            if there is not None and there > here:
                offenders.append(f"{module} ({LAYERS[here][0]}) -> {target} ({LAYERS[there][0]})")
            elif there is None and _within(target, BESIDE) and here != len(LAYERS) - 1:
                offenders.append(f"{module} ({LAYERS[here][0]}) -> {target} (beside the layers)")
    return offenders


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if m != "hf_merge" and _layer(m) is None and not _within(m, BESIDE)]
    assert unplaced == []


def test_imports_go_down_the_layers_only():
    assert _upward_imports(_graph()) == []


def test_an_upward_import_is_found():
    graph = {"hf_merge.recipe": {"hf_merge.watch.policy"}, "hf_merge.watch.policy": {"hf_merge.recipe"},
             "hf_merge.io.checkpoint": {"hf_merge.hub_server.server"}}
    assert _upward_imports(graph) == [
        "hf_merge.io.checkpoint (io) -> hf_merge.hub_server.server (beside the layers)",
        "hf_merge.recipe (config and api) -> hf_merge.watch.policy (watch)",
    ]


def _private_uses(name: str, path: Path, known: set[str]) -> list[str]:
    """``from other import _x`` and ``other_module._x`` where ``other`` is another hf_merge module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    aliases: dict[str, str] = {}  # local name -> hf_merge module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)] if node.level else []
            module = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
            if not module.startswith("hf_merge"):
                continue
            for alias in node.names:
                full = f"{module}.{alias.name}"
                if full in known:
                    aliases[alias.asname or alias.name] = full
                elif alias.name.startswith("_") and not alias.name.startswith("__") and module != name:
                    found.append(f"{name}: from {module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != name):
            found.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_crosses_modules():
    modules = _modules()
    known = set(modules)
    offenders = sorted({use for name, path in modules.items() for use in _private_uses(name, path, known)})
    assert offenders == []


def test_a_private_import_is_found(tmp_path):
    module = tmp_path / "mod.py"
    module.write_text("from hf_merge.recipe import _x\nfrom hf_merge.hub import client as hub\nhub._status(1)\n")
    known = {"hf_merge.recipe", "hf_merge.hub.client", "hf_merge.hub"}
    assert _private_uses("hf_merge.api", module, known) == ["hf_merge.api: from hf_merge.recipe import _x",
                                                             "hf_merge.api: hf_merge.hub.client._status"]
