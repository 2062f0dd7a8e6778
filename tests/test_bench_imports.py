"""The bench's modules import one another without a cycle (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
PREFIX = "turbofleet.bench."


def imports_of(path: Path) -> set[str]:
    """The bench modules `path` imports anywhere in its body."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(PREFIX):
                out.add(node.module.removeprefix(PREFIX).split(".")[0])
            elif node.module == "turbofleet.bench":
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix(PREFIX).split(".")[0] for a in node.names if a.name.startswith(PREFIX))
    return out


def test_no_import_cycle_in_bench() -> None:
    graph = {p.stem: imports_of(p) - {p.stem} for p in BENCH.glob("*.py")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != 1, "import cycle: " + " -> ".join([*path[path.index(n) :], n])
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert {"compare", "main", "overhead", "peers", "fleet", "soak"} <= graph.keys()
