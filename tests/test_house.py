"""House rules for the tests themselves: helpers other modules import live in *_kit.py modules."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, as written (`tests.x`, `x`, or `tests` with its imported names)."""
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
            if node.module == "tests":
                mods |= {f"tests.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:  # from .x import y / from . import x
            mods |= {f"tests.{node.module}"} if node.module else {f"tests.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
    return mods


def test_no_test_module_imports_another() -> None:
    """A test module's helpers that another module needs move into a kit: no module imports a `test_*` one."""
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for mod in sorted(_imported_modules(path)):
            if mod.removeprefix("tests.").split(".")[0].startswith("test_"):
                offenders.append(f"{path.name} imports {mod}")
    assert not offenders, "move shared helpers into a *_kit.py module: " + "; ".join(offenders)


def test_no_shim_modules_remain() -> None:
    """Every helper module is a kit; the old names (procs.py, redis_server.py) re-exporting a kit are gone."""
    helpers = {p.stem for p in TESTS.glob("*.py")} - {"__init__", "conftest"}
    others = sorted(h for h in helpers if not h.startswith("test_") and not h.endswith("_kit"))
    assert not others, f"helper modules that are not *_kit.py (move them into a kit): {others}"
    kits = {p.stem for p in TESTS.glob("*_kit.py")}
    assert {"agent_kit", "procs_kit", "redis_kit", "faults_kit", "inproc_kit", "deploy_kit", "sim_app_kit"} <= kits
