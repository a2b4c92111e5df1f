"""Imports point downward only: the layer table of docs/architecture.md checked against every import in src/copra.

The table ("## Layers") is the single source of truth. In its modules column the backticked names
outside parentheses are the modules (parentheses hold prose): `name/` is a package and everything
under it; a plain `name` is looked up first inside that row's packages (`experiments/`: `demo` is
copra.experiments.demo), then at the top of copra; `copra.name` or `a/b` say it explicitly, and
`copra` alone is the package's `__init__`. Every module under src/copra needs a layer.

Edges are every `import copra...`, `from copra... import` (relative ones too) and
`importlib.import_module("copra...")` with a literal name, at module level or inside a function: a
lazy import is still a dependency (it changes when the other module loads, not whether this one
needs it). `from copra.a import b` is an edge to copra.a.b when that is a module, else to copra.a.
The parent packages Python also runs on `import copra.a.b` are not counted: they are the namespace,
not the dependency. A name built at run time (the experiments registry's f-string) is not seen.
An edge may stay in its layer or go down, never up, and the graph has no cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC, DOC = ROOT / "src" / "copra", ROOT / "docs" / "architecture.md"
NAME = re.compile(r"^(copra\.)?[a-z_][a-z0-9_]*((\.|/)[a-z_][a-z0-9_]*)*/?$")


def modules_of(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package` (a package is its __init__)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def table_rows(markdown: str) -> list[tuple[int, str]]:
    """(layer number, modules cell) of each row of the table under "## Layers"."""
    section = markdown.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) >= 2 and (number := re.match(r"(\d+)\.", cells[0])):
            rows.append((int(number.group(1)), cells[1]))
    assert rows, "docs/architecture.md: no layer table under '## Layers'"
    return rows


def names_outside_parentheses(cell: str) -> list[str]:
    """The backticked module-like names of a cell that are not inside parentheses."""
    names, depth = [], 0
    for index, part in enumerate(cell.split("`")):
        if index % 2 == 0:
            depth += part.count("(") - part.count(")")
        elif depth == 0 and NAME.match(part):
            names.append(part)
    return names


def resolve(name: str, folders: list[str], modules: dict[str, Path]) -> str:
    """The dotted module a table name means in a row whose packages are `folders` (see the module docstring)."""
    dotted = name.rstrip("/").replace("/", ".")
    if dotted == "copra" or dotted.startswith("copra."):
        candidates = [dotted]
    else:
        candidates = [f"copra.{f}.{dotted}" for f in folders if f != dotted] + [f"copra.{dotted}"]
    for candidate in candidates:
        if candidate in modules and (not name.endswith("/") or modules[candidate].name == "__init__.py"):
            return candidate
    raise AssertionError(f"docs/architecture.md: the layer table names `{name}`, which is no "
                         f"{'package' if name.endswith('/') else 'module'} of copra")


def layers_of(markdown: str, modules: dict[str, Path]) -> dict[str, int]:
    """Module -> layer for every module, from the table; AssertionError naming what is missing or listed twice."""
    layer: dict[str, int] = {}
    for number, cell in table_rows(markdown):
        names = names_outside_parentheses(cell)
        folders = [n.rstrip("/").replace("/", ".") for n in names if n.endswith("/")]
        for name in names:
            module = resolve(name, folders, modules)
            covered = [m for m in modules if m == module or (name.endswith("/") and m.startswith(module + "."))]
            for m in covered:
                if layer.setdefault(m, number) != number:
                    raise AssertionError(f"docs/architecture.md: {m} is in layer {layer[m]} and layer {number}")
    missing = sorted(set(modules) - set(layer))
    assert not missing, (f"docs/architecture.md: no layer for {', '.join(missing)}: add them to the table "
                         "(backticked, outside parentheses)")
    return layer


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
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("import_module", "__import__")):
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
    return [f"{where}: {a} (layer {layer[a]}) imports {b} (layer {layer[b]})"
            for a, b, where in edges if layer[b] > layer[a]]


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
    return layers_of(DOC.read_text(encoding="utf-8"), modules), import_edges(modules)


def test_every_module_has_one_layer_in_the_table(graph):
    layer, _ = graph
    assert layer["copra.errors"] == 0 and layer["copra.merge"] == 1 and layer["copra.cli"] == max(layer.values())


def test_imports_point_downward_only(graph):
    layer, edges = graph
    wrong = upward(edges, layer)
    assert not wrong, "imports from a lower layer to a higher one (docs/architecture.md):\n" + "\n".join(wrong)


def test_the_import_graph_has_no_cycle(graph):
    found = cycles(graph[1])
    assert not found, "import cycles inside copra:\n" + "\n".join(found)


TABLE = """# x

## Layers

| layer | modules | may import |
|---|---|---|
| 0. base | `low` (prose: `high` and `run(x) -> y` here name nothing), `copra` | stdlib |
| 1. top | `high`, `pkg/`: `inner` (+ `other`) | layer 0 |

## Next
"""


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in {"__init__.py": "", "pkg/__init__.py": "", **files}.items():
        (tmp_path / "copra" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "copra" / name).write_text(text)
    return modules_of(tmp_path / "copra")


def test_the_checker_names_a_lazy_upward_import_and_a_cycle(tmp_path):
    modules = _package(tmp_path, {
        "low.py": "import os\n\ndef later():\n    from copra.pkg import inner\n",  # lazy, and upward
        "high.py": "import importlib\nimportlib.import_module('copra.low')\n",
        "pkg/inner.py": "from . import other\nfrom ..high import x\n",  # relative: copra.pkg.other, copra.high
        "pkg/other.py": "import copra.pkg.inner\n"})
    layer = layers_of(TABLE, modules)
    assert layer == {"copra": 0, "copra.low": 0, "copra.high": 1, "copra.pkg": 1, "copra.pkg.inner": 1,
                     "copra.pkg.other": 1}
    edges = import_edges(modules)
    assert sorted((a, b) for a, b, _ in edges) == [
        ("copra.high", "copra.low"), ("copra.low", "copra.pkg.inner"), ("copra.pkg.inner", "copra.high"),
        ("copra.pkg.inner", "copra.pkg.other"), ("copra.pkg.other", "copra.pkg.inner")]
    assert upward(edges, layer) == ["copra/low.py:4: copra.low (layer 0) imports copra.pkg.inner (layer 1)"]
    assert cycles(edges) == ["cycle: copra.high -> copra.low (copra/high.py:2) -> copra.pkg.inner (copra/low.py:4) "
                             "-> copra.high (copra/pkg/inner.py:2)"]  # one component: the shortest way round


@pytest.mark.parametrize("table, message", [
    (TABLE.replace(", `copra` |", " |"), "no layer for copra: add"),  # every module needs a layer
    (TABLE.replace("`high`, ", ""), "no layer for copra.high"),
    (TABLE.replace("`low` (", "`lower` ("), "names `lower`, which is no module"),
    (TABLE.replace("`high`, ", "`high/`, "), "names `high/`, which is no package"),
    (TABLE.replace("`high`, ", "`high`, `low`, "), "copra.low is in layer 0 and layer 1"),
])
def test_the_table_must_name_every_module_once(tmp_path, table, message):
    modules = _package(tmp_path, {"low.py": "", "high.py": "", "pkg/inner.py": "", "pkg/other.py": ""})
    with pytest.raises(AssertionError, match=re.escape(message)):
        layers_of(table, modules)
