"""The package's imports form a DAG, counting the imports inside functions too (a cycle hidden in a function-level
import is still a cycle: STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"dspark_lab": ROOT / "dspark_lab", "dspark_lab.backends": ROOT / "backends",
            "dspark_lab.kernels": ROOT / "kernels"}


def module_names() -> dict[str, Path]:
    names = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names[".".join([prefix, *parts])] = path
    return names


def import_graph(names: dict[str, Path]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(names)
    for name, path in names.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                # a module importing its own package's __init__ is how Python loads it, not a dependency
                if target in names and target != name and not name.startswith(target + "."):
                    graph.add_edge(name, target)
    return graph


def test_package_imports_form_a_dag():
    names = module_names()
    assert len(names) > 100 and "dspark_lab.runtime.attach" in names
    graph = import_graph(names)
    assert graph.has_edge("dspark_lab.runtime.attach", "dspark_lab.runtime.patches")  # the walk sees imports
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert cycles == [], f"import cycles: {cycles}"


def test_a_function_level_import_cycle_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("import pkg.b\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    names = {"pkg.a": package / "a.py", "pkg.b": package / "b.py"}
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph(names)) if len(c) > 1]
    assert cycles == [["pkg.a", "pkg.b"]]
