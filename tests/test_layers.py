"""The import graph of `nlm/`: no cycles; the library never imports the applications, the commands or the
CLI; nothing below the CLI and the container entry points imports them (docs/ARCHITECTURE.md, "Layers").

Read from the source with `ast` (every import, module-level or inside a function), so it costs no import."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nlm"
TOP = ("nlm.cli", "nlm.entrypoints")
COMMANDS = ("nlm.commands",)
APPLICATIONS = ("nlm.apps", "nlm.demo", "nlm.pipeline", "nlm.tune")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@functools.lru_cache(maxsize=1)
def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
        graph[name] = {found for target in targets if target.startswith("nlm")
                       for found in [owner(target)] if found not in (None, name, "nlm")}
    return graph


def _layer(module: str) -> int:
    for rank, prefixes in enumerate((TOP, COMMANDS, APPLICATIONS)):
        if module.startswith(prefixes):
            return 3 - rank
    return 0  # the library: config, data, models, distill, training, inference, export, errors


def test_the_import_graph_has_no_cycles():
    graph, order, low, stack, on_stack, cycles = _graph(), {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in order:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize("rule", ["library", "upwards"])
def test_no_module_imports_a_layer_above_its_own(rule):
    graph = _graph()
    wrong = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                   if _layer(target) > _layer(module) and (rule == "upwards" or _layer(module) == 0))
    assert wrong == []


def test_nothing_below_the_cli_imports_it():
    assert sorted(module for module, targets in _graph().items()
                  if "nlm.cli" in targets and not module.startswith(TOP)) == []
