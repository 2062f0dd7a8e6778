"""Where a router's cache hits on the Mooncake trace went (issue 14): for every request with a reusable
prefix (more than its first trace block shared with an earlier request), whether it found it, and for the
misses the route reason kv_aware gave.

    python docs/gpu/issue14_hits.py TRACE.jsonl REQ.jsonl [--n 400]

TRACE.jsonl: the Mooncake trace the bench replayed (its first N lines); REQ.jsonl: the bench's per-request
lines (--requests-out), every router of one run. Reusable tokens of a request: its longest common prefix of
hash ids with any earlier request, times its prompt tokens per hash id. A request "found" it when the server
reported more than 60 % of that many cached tokens.
"""

from __future__ import annotations

import argparse
import collections
import json


def lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("requests")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("-v", action="store_true", help="list the misses")
    args = ap.parse_args()
    with open(args.trace) as f:
        trace = [json.loads(line)["hash_ids"] for _, line in zip(range(args.n), f, strict=False)]
    by: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    with open(args.requests) as f:
        for line in f:
            r = json.loads(line)
            by[r["router"]][r["index"]] = r
    print(f"{'router':40} {'cached tok':>10} {'reusable req':>12} {'missed':>6} {'missed tok':>10}")
    for name, rows in by.items():
        cached = sum(r.get("cached_tokens") or 0 for r in rows.values())
        reusable = missed = 0
        lost = 0.0
        misses = []
        for i, r in sorted(rows.items()):
            if i >= len(trace) or not r.get("prompt_tokens"):
                continue
            h = trace[i]
            shared = max((lcp(h, trace[j]) for j in range(i)), default=0)
            if shared <= 1:
                continue
            reusable += 1
            want = shared * r["prompt_tokens"] / len(h)
            if (r.get("cached_tokens") or 0) <= 0.6 * want:
                missed += 1
                lost += want
                misses.append((i, round(want), r.get("cached_tokens"), (r.get("route") or "")[:80]))
        print(f"{name:40} {cached:>10} {reusable:>12} {missed:>6} {round(lost):>10}")
        if args.v:
            for i, want, got, route in misses:
                print(f"    request {i}: {want} reusable, {got} cached; {route}")


if __name__ == "__main__":
    main()
