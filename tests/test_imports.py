"""The dependency rule of docs/design.md, read from the source: `serving` may import `rerank` and
`towers`, `rerank` may import `towers`, `towers` imports neither, and no module reaches itself
through imports, counting imports inside functions (which hide cycles from the interpreter)."""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("towers", "rerank", "serving")
ORDER = {"towers": 0, "rerank": 1, "serving": 2}  # a package may import only lower ones


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: pathlib.Path, name: str, modules: dict[str, pathlib.Path]) -> set[str]:
    """Project modules that `path` imports anywhere in its body (top level or in functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_the_graph_is_read_from_the_source():
    """The parser sees imports inside functions: `serving.cli` imports its stages lazily."""
    graph = _graph()
    assert {"towers.data", "towers.train", "serving.export"} <= set(graph)
    assert "towers.train" in graph["serving.cli"]  # only inside handler functions


def test_packages_import_only_downwards():
    wrong = sorted(f"{name} imports {target}" for name, targets in _graph().items()
                   for target in targets
                   if ORDER[target.split(".")[0]] > ORDER[name.split(".")[0]])
    assert wrong == []


def test_no_import_cycle():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


def test_the_model_server_stands_alone():
    """`serving.model_server` is a general TF-Serving-compatible server: it imports no stage and
    nothing of `serving` outside itself, so it serves any SavedModel."""
    wrong = sorted(f"{name} imports {target}" for name, targets in _graph().items()
                   if name.startswith("serving.model_server")
                   for target in targets if not target.startswith("serving.model_server"))
    assert wrong == []
