"""What makes a run's TTFT tail, from `bench compare --requests-out` lines (issue 14 round 2; docs/GPU.md).

    python docs/gpu/issue14_tail.py REQUESTS.jsonl [--top 0.02] [--big 8000] [-v]

Per router (only those whose lines name the worker: LMDeploy's proxy and SGLang's gateway do not), from each
request's start and TTFT: what was still waiting for its first token on each worker when it arrived (the
uncached prompt tokens, `prompt_tokens - cached_tokens`, of the requests sent there earlier whose first token
came later). Prints, for the slowest `--top` share: the prompt and its uncached share, the tokens ahead on its
worker and on the least-backlogged one (their difference is what an oracle sending it there would have
spared), and the requests "dragged": ones whose first token came only in the second half of the prefill of a
prompt at least `--big` uncached tokens and 4x their own that reached their worker after them (TurboMind
prefills a step's admissions together). "p99 undragged": each dragged request's TTFT replaced by the median
of requests of its size. Real-token `--big` 8000 for the GPU rig, ~3000 for the sim (token scale 2.94).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from typing import Any


def pct(xs: list[float], q: float) -> float:
    """numpy's default (linear) percentile, as bench/stats.py reports it."""
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def unc(r: dict[str, Any]) -> int:
    return int(r["prompt_tokens"]) - int(r["cached_tokens"] or 0)


def analyse(router: str, rs: list[dict[str, Any]], top: float, big: int, verbose: bool) -> None:
    for r in rs:
        r["t0"] = r["start_s"]
        r["t1"] = r["start_s"] + r["ttft_ms"] / 1000
    workers = sorted({r["worker"] for r in rs})
    for r in rs:
        per = dict.fromkeys(workers, 0)
        for o in rs:
            if o is not r and o["t0"] <= r["t0"] < o["t1"]:
                per[o["worker"]] += unc(o)
        r["ahead"], r["least"] = per[r["worker"]], min(per.values())
        r["dragged"] = next(
            (
                o
                for o in rs
                if o is not r
                and o["worker"] == r["worker"]
                and r["t0"] <= o["t0"] < r["t1"]
                and unc(o) >= max(big, 4 * unc(r))
                and r["t1"] >= o["t0"] + 0.5 * (o["t1"] - o["t0"])
            ),
            None,
        )
    ttft = [r["ttft_ms"] for r in rs]
    tail = sorted(rs, key=lambda r: -r["ttft_ms"])[: max(1, round(len(rs) * top))]
    dragged = [r for r in rs if r["dragged"] is not None]
    undragged = [
        min(r["ttft_ms"], statistics.median(x["ttft_ms"] for x in rs if abs(unc(x) - unc(r)) < max(500, unc(r) * 0.3)))
        if r["dragged"] is not None
        else r["ttft_ms"]
        for r in rs
    ]
    n = len(tail)
    p50, p99, mean = pct(ttft, 0.5), pct(ttft, 0.99), statistics.mean(ttft)
    print(
        f"{router}: n={len(rs)} TTFT p50 {p50:.0f} p99 {p99:.0f} mean {mean:.0f} ms"
        f" | top {n}: prompt mean {sum(r['prompt_tokens'] for r in tail) / n:.0f},"
        f" uncached {100 * sum(unc(r) for r in tail) / sum(r['prompt_tokens'] for r in tail):.0f}%,"
        f" ahead {sum(r['ahead'] for r in tail) / n:.0f} vs least-backlogged {sum(r['least'] for r in tail) / n:.0f}"
        f" | all: excess ahead mean {statistics.mean(r['ahead'] - r['least'] for r in rs):.0f}"
        f" | dragged {len(dragged)} ({sum(r in tail for r in dragged)} in the top),"
        f" p99 undragged {pct(undragged, 0.99):.0f}"
    )
    if verbose:
        for r in tail:
            d = r["dragged"]
            share = 100 * unc(r) / r["prompt_tokens"]
            print(
                f"   {r['ttft_ms']:7.0f} ms  prompt {r['prompt_tokens']:6d} ({share:.0f}% uncached)"
                f"  {r['worker']} ahead {r['ahead']:6d} least {r['least']:6d}"
                + (f"  dragged by {unc(d)} tokens +{(d['t0'] - r['t0']) * 1000:.0f} ms" if d else "")
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("requests")
    ap.add_argument("--top", type=float, default=0.02)
    ap.add_argument("--big", type=int, default=8000)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with open(a.requests) as fh:
        for line in fh:
            r = json.loads(line)
            if r["ttft_ms"] is not None and r["worker"] is not None:
                runs[r["router"]].append(r)
    for router, rs in runs.items():
        analyse(router, rs, a.top, a.big, a.verbose)


if __name__ == "__main__":
    main()
