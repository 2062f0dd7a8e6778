"""From `turbofleet bench ...` arguments to a workload plan (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from turbofleet.bench.plan import Plan, PlanError, build_plan
from turbofleet.cli import build_parser


def plan_for(*argv: str) -> Plan:
    args = build_parser().parse_args(["bench", *argv])
    what = list(args.what)
    return build_plan(args, what[1:] if what[0] == "compare" else what)


def test_multiround_plan_defaults_for_a_small_box() -> None:
    p = plan_for("multiround", "--url", "http://x")
    assert p.multiround is not None and p.total == 32 * 6 and p.user_rate is None
    c = p.multiround
    assert (c.system_tokens, c.first_doc_tokens, c.answer_tokens, c.session_header) == (1000, 1000, 100, True)
    p = plan_for(
        "compare",
        "multiround",
        "--users",
        "3",
        "--rounds",
        "2",
        "--no-session-header",
        "--arrival",
        "poisson",
        "--rate",
        "2",
    )
    assert p.total == 6 and p.user_rate == 2.0 and p.multiround is not None and not p.multiround.session_header
    assert "3 users x 2 rounds" in p.describe()
    # --rate alone means Poisson arrivals of users, as for the other workloads; closed loop keeps them all at once
    assert plan_for("multiround", "--url", "http://x", "--rate", "4").user_rate == 4.0
    assert plan_for("multiround", "--url", "http://x", "--rate", "4", "--arrival", "closed").user_rate is None


def test_static_plans_and_arrivals() -> None:
    p = plan_for("shared-prefix", "--groups", "3", "--prompts-per-group", "2")
    assert p.total == 6 and all(s.arrival is None for s in p.specs)  # closed loop by default
    p = plan_for("random", "--num-requests", "5", "--rate", "10")
    assert p.total == 5 and p.specs[0].arrival == 0.0 and all(s.arrival is not None for s in p.specs)
    assert "open loop" in p.describe()
    with pytest.raises(PlanError, match="rate"):
        plan_for("random", "--arrival", "poisson")
    with pytest.raises(PlanError, match="workload must be"):
        plan_for("bogus")


def test_trace_plan(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 1000 * i, "input_length": 1024, "output_length": 50, "hash_ids": [0, i + 1]} for i in range(4)
    ]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = plan_for("trace", str(trace), "--time-scale", "0.5", "--token-scale", "0.5", "--max-requests", "3")
    assert p.total == 3 and [s.arrival for s in p.specs] == [0.0, 0.5, 1.0]
    assert [s.max_tokens for s in p.specs] == [25, 25, 25]
    # block 0 repeats: 2 of 6 blocks could hit, each 256 tokens of 512 per request
    assert p.meta["hit_rate_upper_bound"] == pytest.approx(2 / 6)
    p = plan_for("trace", "--trace-file", str(trace), "--arrival", "closed")
    assert all(s.arrival is None for s in p.specs)
    with pytest.raises(PlanError, match="needs a FILE"):
        plan_for("trace")
