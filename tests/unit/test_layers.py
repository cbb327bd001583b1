"""The package's layers, read from its source with `ast` (module-level and function-level imports alike):
no import cycle anywhere, no import that points up a layer (README, "Layout"), and the judges (parity, golden
format and comparison, latency timing and statistics, the baseline store) reach no pytest, not even through
another module of the package."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import pytest_neoxmii

ROOT = Path(pytest_neoxmii.__file__).resolve().parent

# Pytest-free by design: they run under any test runner, in worker processes, and in scripts.
JUDGES = (
    "pytest_neoxmii.parity",
    "pytest_neoxmii.golden",
    "pytest_neoxmii.samples",
    "pytest_neoxmii.stats",
    "pytest_neoxmii.latency",
    "pytest_neoxmii.gpu_work",
    "pytest_neoxmii.storage",
    "pytest_neoxmii.storage.store",
    "pytest_neoxmii.storage.schema",
)

# Bottom to top, by module or package name under pytest_neoxmii (README, "Layout"). A module imports only from
# its own layer or below; a new module must be placed here.
LAYERS = (
    ("foundations", ("errors", "outputs", "dtypes", "versions", "hardware", "table", "fixed_text", "registry",
                     "after_import", "compat", "lean_imports", "interrupt", "interpreter_exit", "_child", "files")),
    ("model", ("weights", "checkpoint_files", "cases", "prompts", "serving_config")),
    ("engines", ("backends", "deploy", "injection", "known_issues", "kernels")),
    ("judges", ("parity", "golden", "latency", "gpu_work", "samples", "stats", "storage")),
    # worker: the process an isolated engine runs in (it times the engine with latency.py's timing)
    ("workers", ("worker",)),
    # precision: the session's dtype, bounded by the engines' traits (which run on DeepSpeed's accelerator)
    ("session", ("precision", "session", "options", "reference_first", "ahead_share", "extra_workers",
                 "overhead")),
    ("checks", ("checks", "assertions")),
    ("report", ("report_tables", "report", "markdown_summary", "plot", "gate_between_sessions")),
    ("hooks", ("plugin", "fixtures", "")),          # "": the package itself (its lazy assert_matches_reference)
    ("suite", ("suite",)),
)


def layer_of(module: str) -> int | None:
    """The index in LAYERS of a module of the package (by its first name under the package), None if unplaced."""
    parts = module.split(".")[1:2] or [""]
    return next((i for i, (_, names) in enumerate(LAYERS) if parts[0] in names), None)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package (the acceptance suite and the child-process shim are leaves: nothing in
    the package imports them)."""
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """What `module` imports, wherever the import statement stands: modules of its package by full name
    (`from a import b` counts as importing a.b when that is a module, else a), outside ones by their top-level
    name (pytest, torch)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, path.name == "__init__.py")
            subs = [f"{target}.{alias.name}" for alias in node.names]
            found.update(s for s in subs if s in known)
            if not all(s in known for s in subs):
                found.add(target)
    package = module.split(".")[0]
    inside = {m for m in found if m.split(".")[0] == package}
    # A name of the package that is not one of its modules (a typo, a removed module) is kept as it is.
    return (inside - {module}) | {m.split(".")[0] for m in found if m.split(".")[0] != package}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules it imports: package modules by name, outside ones (pytest, torch) too."""
    modules = package_modules(root)
    known = set(modules)
    return {m: imports_of(m, p, known) for m, p in modules.items()}


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), sorted:
    the sets of modules that import each other (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(components)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle per tangle, starting and ending at its first module."""
    return [_cycle_through(graph, c) for c in tangles(graph)]


def _cycle_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component, starting and ending at its first module
    (breadth-first, so the shortest one)."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return component


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module reachable from `start`, with the import chain that reaches it."""
    chains = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ())):
            if w not in chains:
                chains[w] = chains[v] + [w]
                if w in graph:
                    queue.append(w)
    return chains


# --- the rules ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def package_graph() -> dict[str, set[str]]:
    """The package's graph, parsed once for the rules below (parsing every module took 0.35 s a rule)."""
    return import_graph()


def test_the_package_has_no_import_cycle(package_graph):
    graph = package_graph
    found = [f"{' -> '.join(_cycle_through(graph, t))} (modules importing each other: {', '.join(t)})"
             for t in tangles(graph)]
    assert not found, "import cycles: " + "; ".join(found)


def test_every_module_has_a_layer_and_imports_nothing_above_it(package_graph):
    graph = package_graph
    assert not [m for m in graph if layer_of(m) is None], "modules not placed in LAYERS"
    up = [f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})"
          for m, targets in sorted(graph.items()) for t in sorted(targets)
          if t in graph and layer_of(t) > layer_of(m)]
    assert not up, "imports pointing up a layer: " + "; ".join(up)


@pytest.mark.parametrize("judge", JUDGES)
def test_judges_import_no_pytest(judge, package_graph):
    graph = package_graph
    assert judge in graph, f"{judge} is not a module of the package any more: update JUDGES"
    chains = reachable(graph, judge)
    bad = [" -> ".join(chain) for name, chain in chains.items()
           if name.split(".")[0] in ("pytest", "_pytest", "pluggy")]
    assert not bad, f"{judge} reaches pytest: " + "; ".join(bad)


# --- the tools the rules rely on, on a package made for the purpose ----------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_function_level_and_relative_imports_are_edges(tmp_path):
    root = _write(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg import b\n",
        "b.py": "from .sub.c import x\n",
        "sub/__init__.py": "",
        "sub/c.py": "import pytest\nfrom .. import a\nfrom ..sub import d\n",
        "sub/d.py": "",
    })
    modules = package_modules(root)
    known = set(modules)
    graph = {m: imports_of(m, p, known) for m, p in modules.items()}
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pytest", "pkg.a", "pkg.sub.d"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert reachable(graph, "pkg.a")["pytest"] == ["pkg.a", "pkg.b", "pkg.sub.c", "pytest"]


def test_layers_are_found_by_the_first_name_under_the_package():
    assert LAYERS[layer_of("pytest_neoxmii.checks.golden")][0] == "checks"
    assert LAYERS[layer_of("pytest_neoxmii.golden")][0] == "judges"
    assert LAYERS[layer_of("pytest_neoxmii")][0] == "hooks"
    assert layer_of("pytest_neoxmii.somewhere_new") is None
    assert layer_of("pytest_neoxmii.storage.store") < layer_of("pytest_neoxmii.checks.baseline_policy")


def test_no_cycle_is_reported_for_a_layered_package(tmp_path):
    root = _write(tmp_path, {"__init__.py": "", "low.py": "", "mid.py": "from pkg import low\n",
                             "top.py": "from pkg import mid, low\nimport os.path\n"})
    modules = package_modules(root)
    graph = {m: imports_of(m, p, set(modules)) for m, p in modules.items()}
    assert graph["pkg.top"] == {"pkg.mid", "pkg.low", "os"}
    assert find_cycles(graph) == []
    assert find_cycles({"x": {"x"}}) == [["x", "x"]]
