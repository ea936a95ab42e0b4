"""The package's import graph, read from the sources: no module imports itself back.

Every ``import`` and ``from ... import`` statement of a module counts, wherever it is (inside a
function too: a lazy import is still a dependency). ``from . import x`` is an edge to the
submodule ``x`` where there is one, else to the package. Importing a submodule also runs its
parents' ``__init__``; those implicit edges are left out (every module would otherwise be on a
cycle through its package's ``__init__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "nngp_dist"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE  # this checkout's sources


def _modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted name -> source file, for every module of the package (packages by __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]  # a module's relative imports start from its package
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _targets(node: ast.AST, module: str, is_package: bool, modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = _resolve(module, is_package, node.level, node.module)
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in modules else base)  # a submodule, else a name in base
    return out


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, from every import statement in its source."""
    modules = _modules(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for target in _targets(node, name, is_package, modules):
                # "import a.b.c" names a.b.c; keep the longest prefix that is a module here
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]], within: str = "") -> list[str] | None:
    """A cycle among the modules named ``within`` or under it (``a, b, ..., a``), or None."""

    def inside(m: str) -> bool:
        return not within or m == within or m.startswith(within + ".")

    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if not inside(n) or state.get(n) == 2:
                continue
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            found = visit(n)
            if found:
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if inside(m) and m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_lazy_relative_and_package_imports():
    graph = import_graph()
    fused = graph["nngp_dist.kernels.fused"]
    assert "nngp_dist.kernels._relu_loop" in fused  # imported inside a function
    assert "nngp_dist.backend" in fused  # "from .. import backend"
    assert "nngp_dist.kernels.fused" in graph["nngp_dist.kernels.spec"]  # "from . import fused"
    assert "nngp_dist.kernels.spec" in graph["nngp_dist.kernels"]  # the package's __init__
    assert "nngp_dist.kernels" in graph["nngp_dist"]  # "from .kernels import Spec"


def test_find_cycle_finds_one_within_a_prefix_only():
    graph = {"p.a": {"p.b"}, "p.b": {"q.c"}, "q.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "q.c", "p.a"]
    assert find_cycle(graph, within="p") is None
    graph["p.b"].add("p.d")
    assert find_cycle(graph, within="p") == ["p.a", "p.b", "p.d", "p.a"]


def test_kernels_have_no_import_cycle():
    cycle = find_cycle(import_graph(), within="nngp_dist.kernels")
    assert cycle is None, " -> ".join(cycle)


# The package's layers, top to bottom (docs/architecture.md): a module may import modules of
# its own layer or below, never above. A module of a subpackage belongs to its subpackage's
# layer; a new module must be given one here.
LAYERS = (
    ("nngp_dist", "nngp_dist.cli"),
    (
        "nngp_dist.jobs",
        "nngp_dist.sweep",
        "nngp_dist.figures",
        "nngp_dist.detached",
        "nngp_dist.estimator",
        "nngp_dist.laplace",
        "nngp_dist.laplace_estimator",
        "nngp_dist.trained_figures",
        "nngp_dist.verify",
    ),
    (
        "nngp_dist.compute",
        "nngp_dist.predict",
        "nngp_dist.select",
        "nngp_dist.solvers",
        "nngp_dist.cluster",
    ),
    ("nngp_dist.workers", "nngp_dist.options", "nngp_dist.progress"),
    ("nngp_dist.storage", "nngp_dist.lock"),
    (
        "nngp_dist.layout",
        "nngp_dist.tiling",
        "nngp_dist.datasets",
        "nngp_dist.kernels",
        "nngp_dist.backend",
        "nngp_dist.config",
        "nngp_dist.errors",
        "nngp_dist.likelihoods",
        "nngp_dist._version",
    ),
)


def layer_of(module: str) -> int | None:
    """The index of ``module``'s layer (its own entry, else its subpackage's), or None."""
    for name in (module, module.rpartition(".")[0]):
        for i, layer in enumerate(LAYERS):
            if name in layer:
                return i
    return None


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{m} -> {n}"
        for m, targets in graph.items()
        for n in targets
        if layer_of(m) is not None and layer_of(n) is not None and layer_of(n) < layer_of(m)
    ]


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_every_module_has_a_layer_and_no_import_goes_up():
    graph = import_graph()
    assert [m for m in graph if layer_of(m) is None] == []
    assert upward_edges(graph) == []


def test_an_upward_import_is_found():
    graph = {"nngp_dist.storage": {"nngp_dist.jobs"}, "nngp_dist.jobs": {"nngp_dist.storage"}}
    assert upward_edges(graph) == ["nngp_dist.storage -> nngp_dist.jobs"]
