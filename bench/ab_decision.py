"""One policy's decision time in two source trees, alternated in one run, with a hash of its decisions.

    python -m turbofleet.bench.ab_decision --before DIR [--after DIR] [--rounds 3] [--policy kv_aware]
        [--sizes 10,100,1000] [--decisions 2000] [--seed 1]

For a refactor that must keep the hot path no slower and the decisions the same (issue 17): DIR is the old
tree (`git archive COMMIT | tar -x -C DIR`), `--after` defaults to this checkout. Each round runs each tree in
a fresh `python` with `PYTHONPATH=TREE`, before then after, so both see the same box state as nearly as a
shared machine allows. A child times the policy as bench/microbench_decision.py does (its own tree's copy:
the same fleets, requests and warm-up; the median µs of `choose` on the eligible workers and of `route` on the
whole snapshot), then routes the requests once more with a fresh seeded policy, observing each outcome, and
hashes every decision (worker, reason, pin, matched blocks). Equal hashes: the same decisions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

#: run in each tree's own interpreter; prints one JSON object {size: [choose µs, route µs, decisions hash]}
CHILD = """
import hashlib, json, random, sys
from turbofleet.balancer import Outcome, make_policy, route
from turbofleet.bench import microbench_decision as mb

name, seed, decisions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {}
for n in [int(s) for s in sys.argv[4].split(",")]:
    def ready(options):
        rng = random.Random(seed + n)
        snaps = mb.fleet(n, rng)
        reqs = mb.requests(n, rng, decisions)
        warmup = mb.requests(n, random.Random(seed), min(decisions, 4 * n + 200))
        policy = make_policy(name, **options)
        mb.warm(policy, warmup, snaps[0])
        mb.warm(policy, reqs[: len(reqs) // 4], snaps[1])
        return policy, reqs, snaps
    # timed as the microbench times it (kv_aware unseeded there)
    options = {"seed": seed} if name in ("random", "min_expected_latency") else {}
    policy, reqs, snaps = ready(options)
    choose = mb.time_per_call(policy, reqs, snaps, full=False, cold=False)[0]
    routed = mb.time_per_call(policy, reqs, snaps, full=True, cold=False)[0]
    # the decisions, seeded so that both trees sample alike
    policy, reqs, snaps = ready({"seed": seed})
    digest = hashlib.sha256()
    for i, r in enumerate(reqs):
        d = route(policy, r, snaps[i % len(snaps)])
        digest.update(repr((d.worker_id, d.reason, d.pin, d.matched_blocks)).encode())
        tokens = r.prompt_tokens
        cached = min(tokens, d.matched_blocks * tokens // max(len(r.prefix_hashes), 1))
        policy.observe(Outcome(d.worker_id, r.prefix_hashes, True, 1.0, 0.1, tokens, cached))
    out[n] = [choose, routed, digest.hexdigest()[:16]]
print(json.dumps(out))
"""


def run_tree(tree: Path, policy: str, seed: int, decisions: int, sizes: str) -> dict[str, list[float | str]]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, "-c", CHILD, policy, str(seed), str(decisions), sizes]
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, cwd=tree)
    result: dict[str, list[float | str]] = json.loads(done.stdout)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="the old source tree")
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1], help="the new one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy", default="kv_aware")
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    sizes = [s for s in args.sizes.split(",") if s]
    runs: dict[str, list[dict[str, list[float | str]]]] = {"before": [], "after": []}
    print(f"{args.policy}: median µs per decision, choose / route [decisions hash]")
    print(f"{'run':10s}" + "".join(f"{f'{n} workers':>34s}" for n in sizes))
    for k in range(args.rounds):
        for label, tree in trees.items():
            res = run_tree(tree, args.policy, args.seed, args.decisions, ",".join(sizes))
            runs[label].append(res)
            cells = "".join(f"{f'{res[n][0]:7.1f} / {res[n][1]:7.1f} [{res[n][2]}]':>34s}" for n in sizes)
            print(f"{f'{label} {k + 1}':10s}{cells}", flush=True)
    for label in trees:
        cells = ""
        for n in sizes:
            choose = statistics.median(float(r[n][0]) for r in runs[label])
            routed = statistics.median(float(r[n][1]) for r in runs[label])
            cells += f"{f'{choose:7.1f} / {routed:7.1f}':>34s}"
        print(f"{f'{label} med':10s}{cells}")
    same = all(len({str(r[n][2]) for rs in runs.values() for r in rs}) == 1 for n in sizes)
    print("decisions:", "identical in every run" if same else "DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
