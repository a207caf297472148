"""The package's shape: no import cycles, no oversized modules, a light engine.

The import graph is read from the source with :mod:`ast`, counting imports inside
functions too, and modules loaded by name at run time (``"palflow.x:Name"`` strings,
``import_module("palflow.x")``), so a cycle hidden behind either is found. Run it as
``python -m tests.test_structure`` to print each module's import floor (the longest
chain of palflow imports below it) and its line count.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("pipeline", "apps")
MAX_LINES = 400
ENGINE_CORE_MAX_LINES = 200
HEAVY = ("torch", "mace", "e3nn")
"""Imports that ``pipeline/engine`` keeps out of its module level."""


def module_name(path: Path) -> str:
    """The import name of a source file, e.g. ``palflow.pipeline.engine.core``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["palflow", *parts])


def modules() -> dict[str, Path]:
    """Every module under ``pipeline/`` and ``apps/``, by import name."""
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[module_name(path)] = path
    return found


def _imported(node: ast.AST, name: str, is_package: bool) -> list[str]:
    """The absolute names an import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix, *(f"{prefix}.{alias.name}" for alias in node.names)]


def imports(path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The palflow modules ``path`` imports (anywhere in it), and the top-level
    packages it imports at module level (outside functions)."""
    name = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    inner: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            inner.update(n for n in _imported(node, name, is_package) if n in known)
        elif (target := _imported_by_name(node)) and target in known:
            inner.add(target)  # loaded at run time by name: an edge all the same
    top_level: set[str] = set()
    for node in _module_level(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top_level.update(n.split(".")[0] for n in _imported(node, name, is_package) if n)
    inner.discard(name)
    return inner, top_level


def _imported_by_name(node: ast.AST) -> str | None:
    """The module a string names for a run-time import: ``"palflow.x.y:Name"`` (what
    :func:`palflow.apps.common.import_object` and the registries take) or the argument
    of ``import_module("palflow.x.y")``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        module, colon, attribute = node.value.partition(":")
        if module.startswith("palflow.") and (not colon or attribute.isidentifier()):
            return module  # "palflow.x:Name", or a module's whole name (a table of apps)
    if (
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and str(node.args[0].value).startswith("palflow.")
    ):
        return node.args[0].value
    return None


def _module_level(tree: ast.Module):
    """Statements run on import: the module body, into ``if``/``try`` blocks, not
    into functions or classes' methods."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            stack.extend(node.body)


@functools.cache
def graph() -> dict[str, set[str]]:
    """``module -> palflow modules it imports``; a package's ``__init__`` counts as
    imported by each module below it only where it is named."""
    known = modules()
    return {name: imports(path, known)[0] for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as a list of modules, or None."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if colour.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in colour and (cycle := visit(target)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(edges):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def floors(edges: dict[str, set[str]]) -> dict[str, int]:
    """Each module's import floor: 0 for one importing no palflow module, else one
    more than the highest floor it imports (the graph must have no cycle)."""

    @functools.cache
    def floor(node: str) -> int:
        return 1 + max((floor(t) for t in edges[node]), default=-1)

    return {node: floor(node) for node in edges}


HEAVY_PACKAGES = ("torch", "mace", "e3nn", "parsl", "matplotlib", "xtb", "tblite", "mpi4py", "ase")
"""Packages slow to import or optional: a function may import a palflow module that
loads one of them where it is used, and only such a module. ASE is one: ``ase.io``
alone takes 0.7 s (it loads SciPy), most of what ``palflow run`` spent before it
could say that a file named on its command line is missing."""


def light_modules() -> set[str]:
    """The palflow modules whose import (module level, palflow modules included)
    loads none of :data:`HEAVY_PACKAGES`."""
    known = modules()
    direct = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        own, packages = set(), set()
        for node in _module_level(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node, name, is_package):
                    if target in known:
                        own.add(target)
                    elif target:
                        packages.add(target.split(".")[0])
        own.discard(name)
        direct[name] = (own, packages)

    @functools.cache
    def heavy(name: str, seen: frozenset = frozenset()) -> bool:
        own, packages = direct[name]
        if packages & set(HEAVY_PACKAGES):
            return True
        return any(heavy(o, seen | {name}) for o in own if o not in seen)

    return {name for name in known if not heavy(name)}


def function_level_imports_of_light_modules() -> list[str]:
    """``module:line: imported`` for each import inside a function of a light palflow
    module (``from palflow.x import y``, ``import palflow.x``, or relative), which
    could as well stand at the top."""
    known, light, found = modules(), light_modules(), []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(node) for node in _module_level(tree)}
        for node in ast.walk(tree):
            if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(node, name, path.name == "__init__.py"):
                if target in light and target != name and target != name.rpartition(".")[0]:
                    found.append(f"{name}:{node.lineno}: {target}")
    return found


def line_counts() -> dict[str, int]:
    return {name: len(path.read_text().splitlines()) for name, path in modules().items()}


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


def test_cycle_finder_finds_a_hidden_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"b"}, "d": set()}
    assert find_cycle(edges) == ["b", "c", "b"]
    assert floors({"a": {"b"}, "b": {"c"}, "c": set()}) == {"a": 2, "b": 1, "c": 0}


def test_module_sizes():
    counts = line_counts()
    over = {name: n for name, n in counts.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"
    assert counts["palflow.pipeline.engine.core"] <= ENGINE_CORE_MAX_LINES


def test_engine_imports_no_torch_at_module_level():
    known = modules()
    for name, path in known.items():
        if name.startswith("palflow.pipeline.engine"):
            heavy = imports(path, known)[1] & set(HEAVY)
            assert not heavy, f"{name} imports {heavy} at module level"


def main() -> None:
    """Print each module's import floor and line count, highest floor first."""
    edges = graph()
    cycle = find_cycle(edges)
    if cycle:
        print("import cycle:", " -> ".join(cycle))
        return
    levels, counts = floors(edges), line_counts()
    print(f"{'floor':>5}  {'lines':>5}  module")
    for name in sorted(edges, key=lambda n: (-levels[n], n)):
        print(f"{levels[name]:5d}  {counts[name]:5d}  {name}")
    print(f"{max(levels.values()) + 1} floors, {len(edges)} modules, {sum(counts.values())} lines")


if __name__ == "__main__":
    main()


def test_functions_import_only_heavy_palflow_modules():
    """An import inside a function is kept for a module that loads a heavy package
    (torch, Parsl, ...); a light one is imported at the top, where a reader looks."""
    assert function_level_imports_of_light_modules() == []
