"""The decision microbenchmark runs end to end at small sizes (no timing asserts: the machine is shared)."""

from __future__ import annotations

import pytest

from turbofleet.balancer import POLICIES
from turbofleet.bench import microbench_decision


def test_microbench_prints_a_row_per_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert microbench_decision.main(["--sizes", "3,12", "--decisions", "40"]) == 0
    out = capsys.readouterr().out
    assert "3 workers" in out and "12 workers" in out
    for name in POLICIES:
        assert sum(line.startswith(name) for line in out.splitlines()) == 2  # median and mean tables
    assert "block_hashes" in out


def test_microbench_results_cover_every_policy_and_size() -> None:
    results = microbench_decision.run([4], decisions=20, seed=3, cold=True)
    assert set(results) == {(name, 4) for name in POLICIES}
    assert all(v > 0 for timing in results.values() for v in timing)
