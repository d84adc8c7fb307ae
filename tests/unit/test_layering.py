"""The house's layering: every import inside ``iddpm/`` points down the declared room order.

Order (DESIGN.md): ``config < {diffusion, models, data, runtime} < build < checkpoints < sample < eval < train
< api < cli``; the four rooms in braces are peers and do not import each other.  The package's ``__init__.py``
(room ``iddpm``: version metadata, importing nothing) lies below them all; ``__main__.py`` above the CLI.
Every module is parsed with ``ast`` (no import is executed): all imports count, at module level and inside
functions, absolute and relative.  ``python tests/unit/test_layering.py`` prints the measured room graph.
"""

from __future__ import annotations

import ast
import graphlib
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "iddpm"
REPO_DIR = PACKAGE_DIR.parent

# Rooms each room may import (besides itself).  A decision such as "data may use runtime" is one line here.
# ``iddpm`` is the package's own __init__.py (``__version__``, no imports): the floor every room may read.
# ``__main__`` (``python -m iddpm``) stands on top of the command line.
_FOUNDATION = {"iddpm", "config", "diffusion", "models", "data", "runtime"}
_UP_TO_TRAIN = _FOUNDATION | {"build", "checkpoints", "sample", "eval", "train"}
ALLOWED: dict[str, set[str]] = {
    "iddpm": set(),
    "config": {"iddpm"},
    "diffusion": {"iddpm", "config"},
    "models": {"iddpm", "config"},
    "data": {"iddpm", "config"},
    "runtime": {"iddpm", "config"},
    "build": _FOUNDATION,
    "checkpoints": _FOUNDATION | {"build"},
    "sample": _FOUNDATION | {"build", "checkpoints"},
    "eval": _FOUNDATION | {"build", "checkpoints", "sample"},
    "train": _FOUNDATION | {"build", "checkpoints", "sample", "eval"},
    "api": _UP_TO_TRAIN,
    "cli": _UP_TO_TRAIN | {"api"},
    "__main__": _UP_TO_TRAIN | {"api", "cli"},
}
_SINGLE_MODULE_ROOMS = {"iddpm.config": "config", "iddpm.build": "build", "iddpm.api": "api"}


@dataclass(frozen=True)
class Import:
    path: Path  # the importing file
    line: int
    importer: str  # dotted module name of the importing file
    target: str  # dotted name of the imported iddpm module (a package or a module)
    top_level: bool  # executed at import time (not inside a function)


def module_name(path: Path) -> str:
    """``iddpm/x/y.py`` -> ``iddpm.x.y``; ``iddpm/x/__init__.py`` -> ``iddpm.x``."""
    parts = list(path.relative_to(REPO_DIR).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def room_of(module: str) -> str | None:
    """The room a dotted ``iddpm`` module belongs to, or None when it lies in no declared room."""
    if module in ("iddpm", "iddpm.__main__"):
        return module.rsplit(".", 1)[-1]
    for prefix, room in _SINGLE_MODULE_ROOMS.items():
        if module == prefix or module.startswith(prefix + "."):
            return room
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "iddpm" and parts[1] in ALLOWED and (PACKAGE_DIR / parts[1]).is_dir():
        return parts[1]
    return None


def _resolve(modules: dict[str, Path], name: str) -> str:
    """The longest prefix of ``name`` that is a module of the package (``iddpm.sample.generate`` -> the package)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _walk(node: ast.AST, top_level: bool):
    """(import node, executed at import time) for every import below ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, top_level
        inner = top_level and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _walk(child, inner)


def imports_of(path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of an ``iddpm`` module in one file (relative imports resolved)."""
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    out: list[Import] = []
    for node, top in _walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), True):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import sub`` names the submodule ``pkg.sub``; ``pkg`` itself counts when a name is
            # one of its attributes (``pkg`` runs first either way, as for every submodule import)
            subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
            targets = subs + ([source] if len(subs) < len(node.names) else [])
        for name in targets:
            if name == "iddpm" or name.startswith("iddpm."):
                out.append(Import(path, node.lineno, importer, _resolve(modules, name), top))
    return out


def all_imports() -> list[Import]:
    modules = iter_modules()
    return [imp for path in modules.values() for imp in imports_of(path, modules)]


def _rel(path: Path) -> str:
    return path.relative_to(REPO_DIR).as_posix()


def room_graph() -> dict[str, list[str]]:
    """Measured ``room -> rooms it imports`` (all imports, module level and function-local; itself left out)."""
    graph: dict[str, set[str]] = {room_of(m): set() for m in iter_modules() if room_of(m) is not None}
    for imp in all_imports():
        src, dst = room_of(imp.importer), room_of(imp.target)
        if src is not None and dst is not None and src != dst:
            graph[src].add(dst)
    order = {room: i for i, room in enumerate(ALLOWED)}
    return {room: sorted(graph[room], key=order.get) for room in sorted(graph, key=order.get)}


def format_room_graph(graph: dict[str, list[str]] | None = None) -> str:
    graph = room_graph() if graph is None else graph
    return "\n".join(f"{room} -> {', '.join(deps) if deps else '(nothing)'}" for room, deps in graph.items())


def violations() -> list[str]:
    """``iddpm/x/y.py:LINE imports iddpm.z (room a -> room b)`` for every import against the order."""
    out = []
    for imp in all_imports():
        src, dst = room_of(imp.importer), room_of(imp.target)
        if src is None or dst is None or (src != dst and dst not in ALLOWED[src]):
            out.append(f"{_rel(imp.path)}:{imp.line} imports {imp.target} (room {src} -> room {dst})")
    return out


def test_every_module_lies_in_a_room():
    stray = [_rel(p) for m, p in iter_modules().items() if room_of(m) is None]
    assert not stray, f"modules outside every room of ALLOWED (add the room, or move the file): {stray}"


def test_imports_point_down_the_room_order():
    found = violations()
    assert not found, f"{len(found)} import(s) against the room order:\n" + "\n".join(found)


def test_no_import_cycle_among_module_level_imports():
    graph: dict[str, set[str]] = {m: set() for m in iter_modules()}
    for imp in all_imports():
        if imp.top_level and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle among module-level imports: {' -> '.join(exc.args[1])}") from None


def test_room_graph_matches_the_allowed_order():
    # the declared order itself: acyclic, and closed (a room may use what the rooms below it may use)
    tuple(graphlib.TopologicalSorter(ALLOWED).static_order())
    for room, below in ALLOWED.items():
        for lower in below:
            assert ALLOWED[lower] <= below, f"ALLOWED[{room!r}] lacks {sorted(ALLOWED[lower] - below)} of {lower!r}"
    graph = room_graph()
    assert set(graph) == set(ALLOWED), f"rooms measured {sorted(graph)} vs declared {sorted(ALLOWED)}"
    extra = {room: sorted(set(deps) - ALLOWED[room]) for room, deps in graph.items() if set(deps) - ALLOWED[room]}
    assert not extra, f"room edges not in ALLOWED: {extra}\nmeasured room graph:\n{format_room_graph(graph)}"


if __name__ == "__main__":
    print(format_room_graph())
    found = violations()
    print(f"\n{len(found)} violation(s)" + "".join(f"\n  {v}" for v in found))
    sys.exit(1 if found else 0)
