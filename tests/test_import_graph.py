"""The import graph of ``tracepipe/``: no cycles, and the layering the data path relies on.

Every module under ``tracepipe/`` is parsed with :mod:`ast` (nothing is imported), and every
``import`` / ``from ... import`` statement that names a tracepipe module becomes an edge: at module
level and inside functions and classes alike (a late import hides a cycle from Python, not from
this test). Only the body of ``if TYPE_CHECKING:`` is left out (it never runs). A package is the
node of its ``__init__.py``, with the edges of what that file imports; ``from pkg import name``
points at ``pkg.name`` when that is a module, else at ``pkg``. Importing ``a.b.c`` is an edge to
``a.b.c`` only: Python initializes the parent packages first, so a submodule that imports a
sibling does not depend on its package's ``__init__``. Modules the registries load by name at run
time (``_plugins.load_submodules``) are not edges: they are found through the registry.

Rules:

- no cycle among tracepipe modules;
- a concrete stage module (``tracepipe.stages.<name>``, private helpers included; not
  ``tracepipe.stages.base``, the contract, nor ``tracepipe.stages``, the registry) imports nothing
  from ``tracepipe.pipeline``: stages see rows and a ``StageContext``, never the runtime;
- ``tracepipe.pipeline.runner`` and ``tracepipe.hub`` import nothing from ``tracepipe.outputs``:
  the runner walks the stages, :mod:`tracepipe.publish` writes and pushes after it.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tracepipe"

Graph = dict[str, set[str]]


# -- building the graph ----------------------------------------------------------------------------
def module_files(root: Path) -> dict[str, tuple[Path, bool]]:
    """``dotted module name -> (file, is a package)`` for every ``.py`` file under ``root``."""
    out: dict[str, tuple[Path, bool]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except in ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:  # the `else:` of `if TYPE_CHECKING:` does run
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _owner(name: str, modules: dict[str, tuple[Path, bool]]) -> str | None:
    """The longest prefix of ``name`` that is a module (``a.b.f`` -> ``a.b`` when f is a name in it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, modules: dict[str, tuple[Path, bool]], package: str) -> set[str]:
    """The tracepipe modules ``module`` imports (see the module docstring for what counts)."""
    path, is_pkg = modules[module]
    here = module if is_pkg else module.rpartition(".")[0]
    out: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            targets = [f"{src}.{alias.name}" if f"{src}.{alias.name}" in modules else src for alias in node.names]
        for t in targets:
            if t == package or t.startswith(package + "."):
                owner = _owner(t, modules)
                if owner is not None and owner != module:
                    out.add(owner)
    return out


def import_graph(root: Path = ROOT) -> Graph:
    modules = module_files(root)
    return {m: imports_of(m, modules, root.name) for m in modules}


# -- checks ----------------------------------------------------------------------------------------
def cycles(graph: Graph) -> list[list[str]]:
    """One concrete cycle (``[a, b, ..., a]``) per strongly connected component with a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph has ~100 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(graph, comp) for comp in comps]


def _cycle_through(graph: Graph, comp: list[str]) -> list[str]:
    """A shortest path from ``comp[0]`` back to itself inside the component."""
    start, inside = comp[0], set(comp)
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & inside):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle in component {comp}")  # pragma: no cover


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def stage_imports_of_pipeline(graph: Graph, package: str = "tracepipe") -> list[str]:
    allowed = {f"{package}.stages", f"{package}.stages.base"}
    return sorted(f"{m} -> {t}" for m, ts in graph.items() if _under(m, f"{package}.stages") and m not in allowed
                  for t in ts if _under(t, f"{package}.pipeline"))


def outputs_imports(graph: Graph, package: str = "tracepipe") -> list[str]:
    clean = (f"{package}.pipeline.runner", f"{package}.hub")
    return sorted(f"{m} -> {t}" for m in clean for t in graph.get(m, ()) if _under(t, f"{package}.outputs"))


# -- the package -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> Graph:
    g = import_graph()
    # the parser sees the package: a few edges that must be there
    assert len(g) > 60
    assert "tracepipe.publish" in g["tracepipe.pipeline.runner"]
    assert "tracepipe.outputs._writer" in g["tracepipe.publish"] and "tracepipe.hub" in g["tracepipe.publish"]
    assert "tracepipe.stages.base" in g["tracepipe.stages"]
    assert "tracepipe.engines" in g["tracepipe.stages.base"]  # a function-level import counts
    return g


def test_no_import_cycles(graph: Graph) -> None:
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_concrete_stages_do_not_import_the_pipeline(graph: Graph) -> None:
    bad = stage_imports_of_pipeline(graph)
    assert not bad, "stage modules import the runtime (use tracepipe.contract / tracepipe.hashing / tracepipe.errors):\n  " + "\n  ".join(bad)


def test_runner_and_hub_do_not_import_outputs(graph: Graph) -> None:
    bad = outputs_imports(graph)
    assert not bad, "the runner / hub import the writer (go through tracepipe.publish / tracepipe.locations):\n  " + "\n  ".join(bad)


def test_reserved_column_names_are_defined_once() -> None:
    """``_key``, ``_drop``, ... are assigned in tracepipe/contract.py and nowhere else."""
    from tracepipe import contract

    names = {n for n in dir(contract) if n.endswith("_COL")}
    assert {"KEY_COL", "PARENT_COL", "ORDER_COL", "IN_KEY_COL", "IDX_COL", "DROP_COL", "ERROR_COL", "REASON_COL", "STAGE_COL"} <= names
    values = {getattr(contract, n) for n in names}
    elsewhere = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "contract.py" and path.parent == ROOT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value in values:
                elsewhere += [f"{path.relative_to(ROOT.parent)}:{node.lineno}" for t in node.targets if isinstance(t, ast.Name)]
    assert not elsewhere, f"reserved column names assigned outside tracepipe/contract.py: {elsewhere}"


# -- the checks themselves can fail ----------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "tracepipe" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "tracepipe"


def test_the_checks_catch_what_they_forbid(tmp_path: Path) -> None:
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from tracepipe import b  # a late import is still an edge\n",
        "b.py": "from tracepipe.c import X\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tracepipe.a import f\nX = 1\n",
        "d.py": "from . import e\n",
        "e.py": "from .d import *\n",
        "hub.py": "import tracepipe.outputs._writer\n",
        "outputs/__init__.py": "",
        "outputs/_writer.py": "",
        "pipeline/__init__.py": "",
        "pipeline/runner.py": "def g():\n    from tracepipe.outputs import _writer\n",
        "pipeline/keys.py": "",
        "stages/__init__.py": "from tracepipe.stages.base import S\n",
        "stages/base.py": "from tracepipe.pipeline.keys import K\nS = 1\n",
        "stages/mine.py": "from tracepipe.stages import register\nfrom tracepipe.pipeline import keys\n",
    })
    g = import_graph(pkg)
    assert g["tracepipe.a"] == {"tracepipe.b"} and g["tracepipe.c"] == set()  # TYPE_CHECKING left out
    assert cycles(g) == [["tracepipe.d", "tracepipe.e", "tracepipe.d"]]  # relative imports resolved
    assert stage_imports_of_pipeline(g) == ["tracepipe.stages.mine -> tracepipe.pipeline.keys"]  # base may
    assert outputs_imports(g) == ["tracepipe.hub -> tracepipe.outputs._writer", "tracepipe.pipeline.runner -> tracepipe.outputs._writer"]
    # a function-level import closes a cycle too
    (pkg / "c.py").write_text("def h():\n    import tracepipe.a\n")
    assert cycles(import_graph(pkg)) == [["tracepipe.a", "tracepipe.b", "tracepipe.c", "tracepipe.a"], ["tracepipe.d", "tracepipe.e", "tracepipe.d"]]
