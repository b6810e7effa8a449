"""The package's import graph: modules import only downward, so there is no cycle, lazy imports included."""
import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import han_edge

PACKAGE = Path(han_edge.__file__).parent
BOTTOM = ("han_edge._version", "han_edge.errors", "han_edge.paths", "han_edge.fileio", "han_edge.config", "han_edge.onnx_io")   # file I/O and metadata


def import_graph() -> dict[str, set[str]]:
    """{module: han_edge modules it imports anywhere in its body (function-level imports too)}."""
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import (the package imports absolutely)"
                deps |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["han_edge.jobs"] >= {"han_edge.quantize", "han_edge.exporter"}   # not vacuous
    try:
        order = list(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None
    assert set(order) == set(graph)


def test_cycle_detection_is_not_vacuous():
    graph = import_graph()
    graph["han_edge.errors"] = graph["han_edge.errors"] | {"han_edge.jobs"}   # errors -> jobs -> ... -> errors
    try:
        TopologicalSorter(graph).prepare()
    except CycleError:
        return
    raise AssertionError("a cycle through errors and jobs went unnoticed")


def test_bottom_layer_imports_nothing_above_it():
    graph = import_graph()
    for name in BOTTOM:
        assert graph[name] <= set(BOTTOM), f"{name} imports {sorted(graph[name] - set(BOTTOM))}"
