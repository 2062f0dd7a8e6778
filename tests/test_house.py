"""House rules for the tests themselves: helpers other modules import live in *_kit.py modules."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: test modules still imported by others: the deploy suite's helpers (rewritten by issue 13) and the in-process
#: sim's client (merged from another branch at the end of issue 17); each moves into a kit and off this list
NOT_YET = frozenset({"test_deploy_manifests", "test_deploy_gotemplate", "test_deploy_helm", "test_sim_inprocess"})


def test_test_modules_import_helpers_only_from_kits() -> None:
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
                name = node.module.removeprefix("tests.")
                if name.startswith("test_") and name not in NOT_YET:
                    offenders.append(f"{path.name} imports {node.module}")
    assert not offenders, "move shared helpers into a *_kit.py module: " + "; ".join(offenders)
    kits = {p.stem for p in TESTS.glob("*_kit.py")}
    assert {"agent_kit", "procs_kit", "redis_kit", "faults_kit", "inproc_kit"} <= kits
