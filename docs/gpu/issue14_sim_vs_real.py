"""Issue 14 item 3: the sim against every real run of one workload, from `bench compare --json` files.

    python docs/gpu/issue14_sim_vs_real.py --router turbofleet:kv_aware \\
        --real s28/call1-multi.json s28/call2-multi.json ... --sim sim-multi-1.json sim-multi-2.json

The real rig's runs of one workload differ from each other (multiround TTFT p50 65-80 ms over six calls of the
same code and setup), so one real run is a noisy yardstick. For TTFT p50, p99, mean and output tok/s this
prints the real runs' median and range, the sim runs' median and range, the ratio of the medians, and the
ratio of the sim's median to each real run (lowest, highest): "all within 20 %" when every one of those is in
0.8-1.2. A file without the router is left out, and said so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

COLUMNS = (("TTFT p50", ("ttft_ms", "p50")), ("TTFT p99", ("ttft_ms", "p99")), ("TTFT mean", ("ttft_ms", "mean")),
           ("tok/s", ("output_tokens_per_s",)))


def values(paths: list[str], router: str) -> tuple[dict[str, list[float]], list[str]]:
    out: dict[str, list[float]] = {name: [] for name, _ in COLUMNS}
    missing: list[str] = []
    for p in paths:
        try:
            run: Any = json.loads(Path(p).read_text()).get("runs", {}).get(router)
        except (OSError, ValueError) as e:
            raise SystemExit(f"{p}: {e}") from None
        if not run or not run.get("ok"):
            missing.append(p)
            continue
        for name, keys in COLUMNS:
            v = run
            for k in keys:
                v = v[k]
            out[name].append(float(v))
    return out, missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--router", required=True, help="the router spec as the JSON names it")
    ap.add_argument("--sim-router", help="the sim runs' router, when another (default --router)")
    ap.add_argument("--real", nargs="+", required=True, help="bench compare --json files of the real fleet")
    ap.add_argument("--sim", nargs="+", required=True, help="the same workload's files on the sim")
    args = ap.parse_args(argv)
    real, miss_r = values(args.real, args.router)
    sim, miss_s = values(args.sim, args.sim_router or args.router)
    for p in miss_r + miss_s:
        print(f"# {p}: no run of the router, left out")
    if not real["tok/s"] or not sim["tok/s"]:
        print("no runs to compare", file=sys.stderr)
        return 2
    print(f"{args.router}: {len(real['tok/s'])} real runs, {len(sim['tok/s'])} sim runs")
    print(f"{'column':<10} {'real median [range]':>26} {'sim median [range]':>26} {'ratio':>6} {'per real run':>12}")
    ok = True
    for name, _ in COLUMNS:
        r, s = real[name], sim[name]
        rm, sm = statistics.median(r), statistics.median(s)
        lo, hi = sm / max(r), sm / min(r)
        ok = ok and lo >= 0.8 and hi <= 1.2
        print(f"{name:<10} {rm:>9.1f} [{min(r):>6.1f}-{max(r):>6.1f}] {sm:>9.1f} [{min(s):>6.1f}-{max(s):>6.1f}] "
              f"{sm / rm:>6.2f} {lo:>5.2f}-{hi:<5.2f}")
    print("all within 20 %" if ok else "not all within 20 % of every real run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
