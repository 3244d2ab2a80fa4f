"""The package graph is one-way: no import cycles between modules, no module imports a module of
a higher layer, and no attnkit import hides inside a function (where it would dodge a cycle).

The layers, lowest first, are ``LAYERS`` (docs/architecture.md explains each). A new module
belongs to the layer of its longest listed prefix; a module no prefix covers fails the test, so
every new package is placed on purpose.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import attnkit

SOURCE = Path(attnkit.__file__).parent

#: Layer name -> module prefixes, lowest layer first.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "core",
        (
            "attnkit.version",
            "attnkit._alloc",
            "attnkit.machine",
            "attnkit.costs",
            "attnkit.call",
            "attnkit.masks",
            "attnkit.scores",
            "attnkit.positional",
            "attnkit.merge",
            "attnkit.grid",
            "attnkit.primitives",
            "attnkit.opspec",
            "attnkit.opaque",
        ),
    ),
    ("backends", ("attnkit.backends",)),
    (
        "api",
        (
            "attnkit",  # the package's __init__: the public functions
            "attnkit.calibration",
            "attnkit.dispatch",
            "attnkit.aux",
            "attnkit.api",
            "attnkit.attend",
            "attnkit.testing",
            "attnkit.mechanisms",
        ),
    ),
    ("families", ("attnkit.heads", "attnkit.linear", "attnkit.kv", "attnkit.variants")),
    ("nn", ("attnkit.nn",)),
    ("catalog", ("attnkit.catalog",)),
    # built on the nn models and on transformers: optional, never imported by the layers below
    (
        "integrations",
        (
            "attnkit.integrations",
            "attnkit.data",
            "attnkit.kv.hf",
            "attnkit.kv.evaluate",
            "attnkit.kv.retrieval_heads",
        ),
    ),
    ("bench", ("attnkit.bench",)),
    ("cli", ("attnkit.cli",)),
]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()


def layer_of(module: str) -> int:
    """The index in ``LAYERS`` of ``module``'s longest matching prefix."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "attnkit" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise LookupError(f"{module} is in no layer of LAYERS; add its package to one")
    return best


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The attnkit modules an import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        names = [
            f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
            for alias in node.names
        ]
    return [name for name in names if name in MODULES and name != module]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """Module -> the attnkit modules it imports; and the attnkit imports made inside
    functions, as ``(module, function, statement)``."""
    edges: dict[str, set[str]] = defaultdict(set)
    hidden = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges[module].update(_targets(module, node))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom) and _targets(module, inner):
                        hidden.append((module, node.name, ast.unparse(inner)))
    return edges, hidden


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_cycles():
    edges, _ = import_graph()
    assert cycles(edges) == []


def test_no_module_imports_a_higher_layer():
    edges, _ = import_graph()
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(edges.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


def test_no_attnkit_import_inside_a_function():
    _, hidden = import_graph()
    assert hidden == []


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("attnkit.masks.base", "import attnkit.api", ["attnkit.api"]),
        (
            "attnkit.masks.base",
            "from attnkit import api, scores",
            ["attnkit.api", "attnkit.scores"],
        ),
        ("attnkit.masks", "from . import base", ["attnkit.masks.base"]),
        ("attnkit.masks.base", "from ..backends import sdpa", ["attnkit.backends.sdpa"]),
        ("attnkit.masks.base", "from .patterns import causal", ["attnkit.masks.patterns"]),
    ],
)
def test_imports_resolve_to_modules(module, source, expected):
    assert _targets(module, ast.parse(source).body[0]) == expected


def test_a_cycle_and_an_upward_import_are_found():
    assert cycles({"attnkit.api": {"attnkit.call"}, "attnkit.call": {"attnkit.api"}}) == [
        ["attnkit.api", "attnkit.call"]
    ]
    assert layer_of("attnkit.call") < layer_of("attnkit.api") < layer_of("attnkit.nn.attention")
    assert layer_of("attnkit.kv.hf") > layer_of("attnkit.kv.cache")
