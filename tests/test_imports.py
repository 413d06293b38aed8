"""Imports point one way: no cycles in ranking/, server/ or index_builder/, and the other
packages reach ranking only through its public ``ranking/__init__.py``.

The graph is read from the source with ``ast``, not from ``sys.modules``: every
``import`` counts wherever it stands -- inside a function or under ``TYPE_CHECKING``
too -- because moving an import into a function is how a cycle used to be dodged,
and it is still a cycle of the design (each side needs the other to be understood,
tested or moved). ``from package import name`` counts as an edge to the submodule
when ``name`` is one, to the package otherwise.

Public boundary. ``server/``, ``index_builder/`` and ``bench/`` import ``ranking`` (the
names its ``__init__`` exports), never a module of its layers, so the layers can be
reorganised behind one list of names. The exceptions are listed in
``BOUNDARY_EXCEPTIONS``, each with its reason; tests may pin internals (they test
them). Modules inside ``ranking/`` never import the package itself: its ``__init__``
sits above every layer.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ranking", "server", "index_builder")
CLIENTS = ("server", "index_builder", "bench")

# (importing module, ranking module it may import directly) and why.
BOUNDARY_EXCEPTIONS = {
    # The builder writes the feature tables that ranking.pipeline.features reads: both
    # sides must share one encoding (event keys packed with KEY_SHIFT, the day/hour
    # blocks, the popularity windows and their counting), which is that module's
    # internals, not something the server or anyone else should use.
    ("index_builder.feature_tables", "ranking.pipeline.features"),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_of(packages, root: Path = ROOT) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name (compiled ``.pyx`` ones too)."""
    out = {}
    for pkg in packages:
        for path in sorted([*(root / pkg).rglob("*.py"), *(root / pkg).rglob("*.pyx")]):
            out[module_name(path, root)] = path
    return out


def _resolve(name: str, known) -> str | None:
    """The longest prefix of ``name`` that is one of ``known`` (``a.b.c`` → ``a.b``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def imports_of(module: str, path: Path, known) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from ranking.kernels import scoring`` imports the submodule scoring.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            found = _resolve(target, known)
            if found is not None and found != module:
                out.add(found)
    return out


def import_graph(packages=PACKAGES, root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules_of(packages, root)
    return {m: imports_of(m, p, mods) if p.suffix == ".py" else set() for m, p in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan; the graphs here are small enough to recurse
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in components:
        members = set(comp)
        path, seen = [comp[0]], {comp[0]}
        while True:  # walk inside the component until a module repeats
            nxt = sorted(w for w in graph[path[-1]] if w in members)
            w = next((w for w in nxt if w in seen), None) or nxt[0]
            if w in seen:
                cycles.append(path[path.index(w) :] + [w])
                break
            path.append(w)
            seen.add(w)
    return cycles


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_ranking_layers_import_one_way():
    """The subpackages of ranking (its layers) form no cycle among themselves either."""
    graph = import_graph(("ranking",))
    layer = {m: ".".join(m.split(".")[:2]) for m in graph}
    layers: dict[str, set[str]] = {}
    for m, targets in graph.items():
        layers.setdefault(layer[m], set()).update(layer[t] for t in targets if layer[t] != layer[m])
    cycles = find_cycles(layers)
    assert not cycles, "layer cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_ranking_internals_never_import_the_public_package():
    graph = import_graph(("ranking",))
    bad = sorted(m for m, targets in graph.items() if m != "ranking" and "ranking" in targets)
    assert not bad, f"import from the module that defines the name, not from ranking: {bad}"


def test_other_packages_use_the_public_api():
    ranking_modules = modules_of(("ranking",))
    bad = []
    for m, path in modules_of(CLIENTS).items():
        if path.suffix != ".py":
            continue
        for target in sorted(imports_of(m, path, ranking_modules)):
            if target != "ranking" and (m, target) not in BOUNDARY_EXCEPTIONS:
                bad.append(f"{m} imports {target}")
    assert not bad, "import these names from ranking (or list a reasoned exception): " + "; ".join(bad)


def test_boundary_exceptions_are_still_needed():
    ranking_modules = modules_of(("ranking",))
    clients = modules_of(CLIENTS)
    for importer, target in BOUNDARY_EXCEPTIONS:
        assert target in imports_of(importer, clients[importer], ranking_modules), (importer, target)


def test_public_names_resolve():
    """Every name the public package exports is defined where its table says, and the
    ``TYPE_CHECKING`` imports type checkers read list the same names and modules."""
    ranking = importlib.import_module("ranking")
    exports = ranking._EXPORTS
    tree = ast.parse((ROOT / "ranking" / "__init__.py").read_text(encoding="utf-8"))
    blocks = [n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]
    declared = {
        a.asname or a.name: node.module
        for block in blocks
        for node in ast.walk(block)
        if isinstance(node, ast.ImportFrom)
        for a in node.names
    }
    assert declared == exports
    assert sorted(ranking.__all__) == sorted(exports)
    for name, module in exports.items():
        assert getattr(ranking, name) is getattr(importlib.import_module(module), name), name


def test_cycle_finder_names_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_and_relative_imports_count(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from p.b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    graph = import_graph(("p",), tmp_path)
    assert graph["p.a"] == {"p.b"} and graph["p.b"] == {"p.a"}
    assert find_cycles(graph) == [["p.a", "p.b", "p.a"]]
