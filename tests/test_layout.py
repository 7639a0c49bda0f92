"""The package's own imports, read from its source: no import circles, no crossings into other modules' private
names, no import from a higher layer (``LAYERS``; docs/layout.md), and the runtime never imports the offline
tools.  Imports inside functions count too (a lazy import hides a circle; it does not remove it); imports only
for type checking do not."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dispatchattn"

def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:``."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            lines.update(n.lineno for child in node.body for n in ast.walk(child) if hasattr(n, "lineno"))
    return lines


def _imports(name: str) -> list[tuple[str, str]]:
    """(module imported, name imported or "") of every package-internal import in module ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name.removeprefix("dispatchattn."), "") for a in node.names
                      if a.name.startswith("dispatchattn.")]
            continue
        if node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            module = ".".join([*base, *([node.module] if node.module else [])])
        elif node.module and node.module.startswith("dispatchattn"):
            module = node.module.removeprefix("dispatchattn").lstrip(".")
        else:
            continue
        for alias in node.names:
            submodule = f"{module}.{alias.name}" if module else alias.name
            found.append((submodule, "") if submodule in MODULES else (module, alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name in MODULES:
        targets = set()
        for module, _ in _imports(name):
            while module and module not in MODULES:
                module = module.rpartition(".")[0]
            if module != name and module in MODULES:
                targets.add(module)
        graph[name] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_import_graph_has_no_circle():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names():
    crossings = {(name, module, imported) for name in MODULES for module, imported in _imports(name)
                 if imported.startswith("_") and not imported.startswith("__")}
    assert crossings == set()


#: The layers, top to bottom: a module imports modules of its own layer or of layers below it, never above.  A
#: module belongs to the layer of the longest name or package (``tools`` holds ``tools.*``) that names it.
LAYERS = [
    ("commands", ["__main__", "cli"]),  # python -m dispatchattn: registers the tools' commands
    ("tools", ["tools"]),  # offline only: AOT report, compile checks, regeneration of shipped data, selftest
    ("front ends", ["integrations", "matrix", "tuning.cli"]),  # other libraries' registries, docs matrix, tune
    ("api", ["", "api", "compiled", "fallback", "varlen"]),
    ("deciding", ["decide", "measured"]),  # rankings and failures looked up, select, then config; timing backends
    ("selector", ["selector"]),
    ("backends", ["backends"]),
    ("tuning", ["tuning"]),  # the config a call runs with, shipped and measured data, timing on the device
    ("kernels", [f"backends.triton_flex.{name}" for name in (
        "autograd", "decode", "ladder", "block_mask", "codegen", "emit", "kernels", "decode_kernels")]),
    ("records", ["failures", "tuning.store", "tuning.config"]),
    ("arguments", ["spec", "mask_plan", "packed", "masks", "scores"]),
    ("hardware", ["capabilities", "vendor_tables"]),
    ("base", ["envs", "paths", "version", "timing", "explain_log"]),
]


def _layer(name: str) -> int | None:
    """Index in ``LAYERS`` (0 is the top) of module ``name``, or None when no layer names it."""
    found = [(len(entry), index) for index, (_, entries) in enumerate(LAYERS) for entry in entries
             if name == entry or (entry and name.startswith(entry + "."))]
    return max(found)[1] if found else None


def test_every_module_has_a_layer():
    assert [name for name in MODULES if _layer(name) is None] == []


def _upward(graph: dict[str, set[str]]) -> set[tuple[str, str, str, str]]:
    """(importer, its layer, module imported, that module's layer) of every import from a higher layer."""
    return {(name, LAYERS[_layer(name)][0], target, LAYERS[_layer(target)][0])
            for name, targets in graph.items() for target in targets if _layer(target) < _layer(name)}


def test_no_module_imports_from_a_layer_above_its_own():
    assert _upward(_graph()) == set()


def test_the_runtime_never_imports_the_tools():
    importers = {name for name, targets in _graph().items() for target in targets
                 if target == "tools" or target.startswith("tools.")}
    assert {name for name in importers if not name.startswith("tools")} <= {"cli", "__main__"}


def test_the_layer_check_finds_an_upward_import():
    assert _layer("tuning.lookup") > _layer("backends.triton_flex.backend") > _layer("selector")
    assert _layer("backends.triton_flex.kernels") > _layer("tuning.measure") and _layer("tools.aot") == _layer("tools")
    graph = {"masks": {"api"}, "api": {"masks"}, "tuning.measure": {"backends.triton_flex.autograd"}}
    assert _upward(graph) == {("masks", "arguments", "api", "api")}
