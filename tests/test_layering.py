"""The package's import graph has no cycle: every import statement of every module (local and TYPE_CHECKING
imports included) is an edge, and the strongly connected components are all single modules. Imports inside a
module's own `__getattr__` (PEP 562: where a deprecated name is still found after it moved) are not edges."""

import ast
from pathlib import Path

import pytest

import hf_kvcache

PACKAGE = Path(hf_kvcache.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """Module name -> the package modules it imports (a `from package import name` of a submodule counts as
    importing that submodule)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        tree.body = [
            node for node in tree.body if not (isinstance(node, ast.FunctionDef) and node.name == "__getattr__")
        ]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 60 and sum(map(len, graph.values())) > 150  # the whole package was read
    assert cycles(graph) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_layers_import_only_downwards():
    """`attention` (transformers' attention and masks) imports nothing else of hf_kvcache; the low-bit primitives
    and file formats of `quant` import no cache; the policy contract imports no cache."""
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("hf_kvcache.attention"):
            assert all(target.startswith("hf_kvcache.attention") for target in targets), (name, targets)
        if name.startswith("hf_kvcache.quant"):
            assert not any(target.startswith(("hf_kvcache.caches", "hf_kvcache.calibration")) for target in targets), (
                name,
                targets,
            )
    assert not any(target.startswith("hf_kvcache.caches") for target in graph["hf_kvcache.policies.base"])


def test_a_moved_calibration_name_is_still_found_with_a_deprecation_warning():
    from hf_kvcache.calibration import bit_profiles
    from hf_kvcache.quant import calibration

    with pytest.warns(DeprecationWarning, match="hf_kvcache.calibration.bit_profiles"):
        assert calibration.calibrate_bit_profile is bit_profiles.calibrate_bit_profile
