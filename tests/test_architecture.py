"""Imports point downward only: `LAYERS` below maps each package of src/copra to its layer, and every
import in src/copra is checked against it.

A module's layer is its top-level package's (`copra.adapters.merge` -> "adapters"); `copra` itself (the
public surface, `__init__`) sits with the CLI on top. A package or module under src/copra that `LAYERS`
does not name fails the test: a new package gets a layer when it is added.

Edges are every `import copra...`, `from copra... import` (relative ones too) and
`importlib.import_module("copra...")` with a literal name, at module level or inside a function: a
lazy import is still a dependency (it changes when the other module loads, not whether this one
needs it). `from copra.a import b` is an edge to copra.a.b when that is a module, else to copra.a.
The parent packages Python also runs on `import copra.a.b` are not counted: they are the namespace,
not the dependency. A name built at run time (the experiments registry's f-string) is not seen.
An edge may stay in its layer or go down, never up; neither the modules nor the packages form a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "copra"

# The architecture: what each package is for is its __init__'s docstring; docs/architecture.md tells it in prose.
LAYERS = {
    "utils": 0,  # errors, compat, atomic files, locks, settings files, precision
    "core": 1,  # schedule, gates, run config, Trainer callback: CopRA itself
    "adapters": 1,  # PEFT folders and state dicts: io, merge, align, prune, PEFT's merge methods
    "data": 2,  # tasks, few-shot sampling, the user's files
    "models": 3,  # backbones with LoRA attached, scoring, evaluation
    "analysis": 4,  # Shapley values, coalition games on a model, paired statistics
    "training": 5,  # the loop, checkpoints, what a run leaves on disk
    "federated": 6,  # the FL protocol, Flower's simulation engine, the deployment app
    "experiments": 7,  # one module per paper experiment; runner/: how they run
    "report": 8,  # the reproduce suite, verdicts, figures, the report
    "cli": 9,
    "__main__": 9,
    "copra": 9,  # the package's public surface
}


def modules_of(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package` (a package is its __init__)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def group_of(module: str) -> str:
    """The top-level package (or module) of copra that `module` belongs to; "copra" for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "copra"


def layers_of(modules: dict[str, Path], layers: dict[str, int] = LAYERS) -> dict[str, int]:
    """Module -> layer for every module; AssertionError naming the packages `layers` leaves out."""
    missing = sorted({group_of(m) for m in modules} - set(layers))
    assert not missing, f"tests/test_architecture.py: no layer for {', '.join(missing)}: add them to LAYERS"
    return {m: layers[group_of(m)] for m in modules}


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The longest copra module that `name` starts with (None outside copra)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def _imported_names(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    if (
        isinstance(node, ast.Call)
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
        and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("import_module", "__import__")
    ):
        return [node.args[0].value]
    return []


def import_edges(modules: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(importer, imported, "file:line") for every import between two different copra modules."""
    edges, top = [], modules["copra"].parent.parent
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for name in _imported_names(node, module, path.name == "__init__.py", modules):
                target = _target(name, modules)
                edge = (module, target, f"{path.relative_to(top)}:{node.lineno}")
                if target is not None and target != module and edge not in edges:
                    edges.append(edge)
    return edges


def upward(edges: list[tuple[str, str, str]], layer: dict[str, int]) -> list[str]:
    """One line per import from a lower layer to a higher one."""
    return [
        f"{where}: {a} (layer {layer[a]}) imports {b} (layer {layer[b]})"
        for a, b, where in edges
        if layer[b] > layer[a]
    ]


def cycles(edges: list[tuple[str, str, str]]) -> list[str]:
    """One line per strongly connected component of more than one module: a cycle through it, edge by edge."""
    graph: dict[str, dict[str, str]] = {}
    for a, b, where in edges:
        graph.setdefault(a, {}).setdefault(b, where)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[str] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(_cycle_through(node, set(component), graph))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_through(start: str, component: set[str], graph: dict[str, dict[str, str]]) -> str:
    """A shortest path start -> ... -> start inside `component`, as "a -> b (file:line) -> ..."."""
    previous: dict[str, str] = {}
    frontier = [start]
    while start not in previous:  # breadth first until the walk comes back to start
        following = []
        for node in frontier:
            for nxt in graph.get(node, {}):
                if nxt in component and nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    path = [start]
    while len(path) == 1 or path[-1] != start:
        path.append(previous[path[-1]])
    path.reverse()
    return "cycle: " + path[0] + "".join(f" -> {b} ({graph[a][b]})" for a, b in zip(path, path[1:]))


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, int], list[tuple[str, str, str]]]:
    modules = modules_of(SRC)
    return layers_of(modules), import_edges(modules)


def test_every_package_has_a_layer(graph):
    layer, _ = graph
    assert (
        layer["copra.utils.errors"] == 0
        and layer["copra.adapters.merge"] == 1
        and layer["copra.cli"] == max(layer.values())
    )
    assert set(LAYERS) == {group_of(m) for m in modules_of(SRC)}  # no layer for a package that is gone


def test_imports_point_downward_only(graph):
    layer, edges = graph
    wrong = upward(edges, layer)
    assert not wrong, "imports from a lower layer to a higher one (LAYERS):\n" + "\n".join(wrong)


def test_the_import_graph_has_no_cycle(graph):
    found = cycles(graph[1])
    assert not found, "import cycles inside copra:\n" + "\n".join(found)


def test_the_packages_form_no_cycle(graph):
    found = cycles(package_edges(graph[1]))
    assert not found, "import cycles between copra's packages:\n" + "\n".join(found)


def package_edges(edges: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The module edges seen between top-level packages (one per pair, the first where)."""
    seen: dict[tuple[str, str], str] = {}
    for a, b, where in edges:
        if group_of(a) != group_of(b):
            seen.setdefault((group_of(a), group_of(b)), where)
    return [(a, b, where) for (a, b), where in seen.items()]


TINY = {"copra": 0, "low": 0, "pkg": 1, "high": 1}


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in {"__init__.py": "", "pkg/__init__.py": "", **files}.items():
        (tmp_path / "copra" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "copra" / name).write_text(text)
    return modules_of(tmp_path / "copra")


def test_the_checker_names_a_lazy_upward_import_and_a_cycle(tmp_path):
    modules = _package(
        tmp_path,
        {
            "low.py": "import os\n\ndef later():\n    from copra.pkg import inner\n",  # lazy, and upward
            "high.py": "import importlib\nimportlib.import_module('copra.low')\n",
            "pkg/inner.py": "from . import other\nfrom ..high import x\n",  # relative: copra.pkg.other, copra.high
            "pkg/other.py": "import copra.pkg.inner\n",
        },
    )
    layer = layers_of(modules, TINY)
    assert layer == {
        "copra": 0,
        "copra.low": 0,
        "copra.high": 1,
        "copra.pkg": 1,
        "copra.pkg.inner": 1,
        "copra.pkg.other": 1,
    }
    edges = import_edges(modules)
    assert sorted((a, b) for a, b, _ in edges) == [
        ("copra.high", "copra.low"),
        ("copra.low", "copra.pkg.inner"),
        ("copra.pkg.inner", "copra.high"),
        ("copra.pkg.inner", "copra.pkg.other"),
        ("copra.pkg.other", "copra.pkg.inner"),
    ]
    assert upward(edges, layer) == ["copra/low.py:4: copra.low (layer 0) imports copra.pkg.inner (layer 1)"]
    assert cycles(edges) == [
        "cycle: copra.high -> copra.low (copra/high.py:2) -> copra.pkg.inner (copra/low.py:4) "
        "-> copra.high (copra/pkg/inner.py:2)"
    ]  # one component: the shortest way round


def test_a_package_without_a_layer_fails(tmp_path):
    modules = _package(tmp_path, {"low.py": "", "high.py": "", "pkg/inner.py": "", "new/thing.py": ""})
    with pytest.raises(AssertionError, match="no layer for new: add them to LAYERS"):
        layers_of(modules, TINY)


def test_the_real_tree_fails_when_an_upward_import_is_put_back(tmp_path):
    """A copy of src/copra with one lazy upward import (the gates reading the training loop) fails the check."""
    import shutil

    shutil.copytree(SRC, tmp_path / "copra", ignore=shutil.ignore_patterns("__pycache__"))
    gates = tmp_path / "copra" / "core" / "gates.py"
    gates.write_text(gates.read_text() + "\n\ndef _upward():\n    from copra.training.loop import train\n")
    modules = modules_of(tmp_path / "copra")
    wrong = upward(import_edges(modules), layers_of(modules))
    assert wrong == [
        f"copra/core/gates.py:{len(gates.read_text().splitlines())}: copra.core.gates (layer 1) "
        "imports copra.training.loop (layer 5)"
    ]
