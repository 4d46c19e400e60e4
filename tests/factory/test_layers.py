"""The factory model's layers: physics never imports the fitter, and no module imports
itself back through others (one place for each concept)."""

from __future__ import annotations

import ast
from importlib import resources
from pathlib import Path

PKG = Path(str(resources.files("tokenfab.factory")))
PHYSICS = {"catalog", "modelspec", "perf", "serving", "params", "search", "pareto"}
FIT = {"calibrate", "crossval", "validate", "measured", "validate_report"}


def _imports() -> dict[str, set[str]]:
    """Module -> factory modules it imports (top level or inside functions)."""
    out: dict[str, set[str]] = {}
    for f in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "tokenfab.factory."
            ):
                deps.add(node.module.split(".")[2])
        out[f.stem] = deps
    return out


def test_physics_does_not_import_the_fit():
    g = _imports()
    for m in PHYSICS:
        assert not (g[m] & FIT), f"{m} imports {g[m] & FIT}"


def test_no_import_cycles():
    g = _imports()

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(g.get(start, ()))
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += g.get(m, ())
        return seen

    assert not [m for m in g if m in reach(m)]
