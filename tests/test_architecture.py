"""The package's import graph has no circles: every import counts, deferred (inside functions) ones included.

Read with ``ast``, not by importing: a deferred import that would close a circle fails here before it bites.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "moe_dist"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module → the package modules it imports (anywhere in the file)."""
    package = root.name
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import sub`` imports the submodule pkg.sub when there is one.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in files and target.split(".")[0] == package and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_no_import_circle_in_the_package():
    graph = import_graph(ROOT)
    assert len(graph) > 20  # the whole package was read
    assert circles(graph) == []


def test_config_imports_nothing_from_the_package():
    assert import_graph(ROOT)[f"{PACKAGE}.config"] == set()


def test_no_engine_imports_another():
    graph = import_graph(ROOT)
    engines = {m for m in graph if m.startswith(f"{PACKAGE}.engines.") and not m.endswith(".base")}
    for engine in engines:
        assert not graph[engine] & (engines - {engine}), (engine, graph[engine])


def test_the_detector_finds_deferred_and_relative_circles(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from moe_dist.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")  # deferred and relative
    (pkg / "c.py").write_text("import moe_dist.a\n")
    (pkg / "d.py").write_text("from moe_dist import a\n")  # imports into the circle, not part of it
    assert circles(import_graph(pkg)) == [["moe_dist.a", "moe_dist.c", "moe_dist.sub.b"]]
