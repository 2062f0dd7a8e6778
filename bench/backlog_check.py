"""The prefill backlog kv_aware estimated at each dispatch, against the truth (issue 14).

Input: the per-request lines of a bench run (`--requests-out`) of a turbofleet proxy started with
TURBOFLEET_BACKLOG_AUDIT=1 in its environment, so that each route reason ends with
`[backlog modelled=M measured=S uncached=U]`: the chosen worker's modelled backlog (balancer/backlog.py),
its measured one (balancer/measured.py) and the prompt's predicted uncached tokens, all at dispatch.

The truth for a request r on worker w: the uncached prompt tokens (prompt_tokens - cached_tokens, as the
worker reported them) of every request sent to w before r whose first token came after r was sent: the
prefill r waits behind. Times are the client's (start_s, start_s + ttft_ms), on loopback within a
millisecond of the proxy's.

    python -m turbofleet.bench.backlog_check REQUESTS.jsonl [--router LABEL] [--json OUT]

Prints, per router and estimate, the absolute error's p50 and p90 in tokens, the same over requests that
had any backlog ahead, and the mean truth.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from typing import Any

NOTE = re.compile(r"\[backlog modelled=(-?\d+) measured=(-?\d+) uncached=(-?\d+)\]")


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def truths(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with an audit note, each with `truth`, `modelled`, `measured`, `pred_uncached`, `uncached`."""
    ok = [r for r in rows if r.get("ttft_ms") is not None and r.get("status") == 200 and r.get("worker")]
    by_worker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        by_worker[r["worker"]].append(r)
    out = []
    for group in by_worker.values():
        group.sort(key=lambda r: r["start_s"])
        for i, r in enumerate(group):
            m = NOTE.search(r.get("route") or "")
            if not m:
                continue
            t = r["start_s"]
            truth = 0.0
            for q in group[:i]:
                if q["start_s"] + q["ttft_ms"] / 1000.0 > t:
                    truth += max(0, (q["prompt_tokens"] or 0) - (q["cached_tokens"] or 0))
            out.append(
                {
                    "index": r["index"],
                    "worker": r["worker"],
                    "truth": truth,
                    "modelled": float(m.group(1)),
                    "measured": float(m.group(2)),
                    "pred_uncached": float(m.group(3)),
                    "uncached": max(0, (r["prompt_tokens"] or 0) - (r["cached_tokens"] or 0)),
                }
            )
    return out


def summarize(points: list[dict[str, Any]]) -> dict[str, Any]:
    res: dict[str, Any] = {"requests": len(points)}
    if not points:
        return res
    busy = [p for p in points if p["truth"] > 0]
    res["mean_truth"] = sum(p["truth"] for p in points) / len(points)
    res["with_backlog"] = len(busy)
    for k in ("modelled", "measured"):
        err = [abs(p[k] - p["truth"]) for p in points]
        err_busy = [abs(p[k] - p["truth"]) for p in busy]
        res[k] = {
            "abs_err_p50": _pct(err, 0.5),
            "abs_err_p90": _pct(err, 0.9),
            "abs_err_p50_busy": _pct(err_busy, 0.5),
            "abs_err_p90_busy": _pct(err_busy, 0.9),
            "mean_estimate": sum(p[k] for p in points) / len(points),
        }
    e = [abs(p["pred_uncached"] - p["uncached"]) for p in points]
    res["uncached_prediction"] = {"abs_err_p50": _pct(e, 0.5), "abs_err_p90": _pct(e, 0.9)}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("requests", nargs="+", help="--requests-out files")
    ap.add_argument("--router", help="only this router label (default: every label with audit notes)")
    ap.add_argument("--json", help="write the summaries here")
    args = ap.parse_args(argv)
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in args.requests:
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows[f"{path}:{r['router']}"].append(r)
    out = {}
    for label, rs in rows.items():
        if args.router and not label.endswith(":" + args.router):
            continue
        pts = truths(rs)
        if not pts:
            continue
        s = out[label] = summarize(pts)
        print(
            f"{label}: {s['requests']} requests, {s['with_backlog']} with a backlog ahead, mean truth "
            f"{s['mean_truth']:.0f} tokens"
        )
        for k in ("modelled", "measured"):
            e = s[k]
            print(
                f"  {k:9s} |error| p50 {e['abs_err_p50']:.0f} p90 {e['abs_err_p90']:.0f} tokens; with a backlog "
                f"ahead p50 {e['abs_err_p50_busy'] or 0:.0f} p90 {e['abs_err_p90_busy'] or 0:.0f}; mean estimate "
                f"{e['mean_estimate']:.0f}"
            )
        u = s["uncached_prediction"]
        print(f"  uncached-token prediction |error| p50 {u['abs_err_p50']:.0f} p90 {u['abs_err_p90']:.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if not out:
        print("no request carried a backlog note (was TURBOFLEET_BACKLOG_AUDIT=1 set for the proxy?)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
