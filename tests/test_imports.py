"""The package's import structure (ARCHITECTURE.md, "Layers"): every module imports in a fresh interpreter,
the import graph (lazy imports inside functions included) has no cycle, library code never imports a
command, and each layer imports only the layers below it."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "reid_keras"
# `python -m reid_keras.<command>` entry points: thin modules over reid_keras.cli.
ENTRY_POINTS = {f"reid_keras.{name}" for name in ("train", "evaluate", "export", "match", "visualize", "experiment",
                                                   "evaluate_search")}
ENTRY_POINTS.add("reid_keras.data.__main__")
# What each layer may not import (its own layer and the ones below it are fine).
FORBIDDEN = {
    "reid_keras.data": ("reid_keras.models", "reid_keras.metrics", "reid_keras.training", "reid_keras.families",
                        "reid_keras.paper_tables", "reid_keras.activation_maps", "reid_keras.cli"),
    "reid_keras.models": ("reid_keras.metrics", "reid_keras.training", "reid_keras.families",
                          "reid_keras.paper_tables", "reid_keras.activation_maps", "reid_keras.cli"),
    "reid_keras.metrics": ("reid_keras.training", "reid_keras.families", "reid_keras.paper_tables",
                           "reid_keras.activation_maps", "reid_keras.cli"),
    "reid_keras.training": ("reid_keras.families", "reid_keras.paper_tables", "reid_keras.activation_maps",
                            "reid_keras.cli"),
    "reid_keras.families": ("reid_keras.paper_tables", "reid_keras.activation_maps", "reid_keras.cli"),
}


def _modules() -> dict:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _is_main_block(node) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and getattr(node.test.left, "id", None) == "__name__")


def import_graph() -> dict:
    """{module: set of reid_keras modules it imports}, from the source (every import statement, lazy ones
    too, except under `if __name__ == "__main__":`, where a library module may hand over to its command)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skipped = {id(sub) for node in ast.walk(tree) if _is_main_block(node) for sub in ast.walk(node)}
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 60 and "reid_keras.families.base" in graph["reid_keras.families.siamese"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_library_modules_never_import_a_command():
    graph = import_graph()
    commands = {m for m in graph if m.startswith("reid_keras.cli")} | ENTRY_POINTS
    offenders = {m: sorted(graph[m] & commands) for m in graph if m not in commands and graph[m] & commands}
    assert offenders == {}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_downwards_only(layer):
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t.startswith(FORBIDDEN[layer]))
                 for m, targets in graph.items()
                 if (m == layer or m.startswith(layer + ".")) and m not in ENTRY_POINTS}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(m for m in _modules() if not m.endswith("__main__"))
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('ok')"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
