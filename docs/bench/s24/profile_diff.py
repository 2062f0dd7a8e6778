"""Differential py-spy profile: each function's inclusive microseconds per request, revision A minus B.

    python profile_diff.py A.raw A_REQ_PER_S B.raw B_REQ_PER_S [--top 45] [--labels main,base]

Input: `py-spy record -f raw` of a router that kept one core busy, with the req/s the bench printed while it
was profiled: a function's share of the samples times the time per request is what it costs each request.
A frame counts once per stack (recursion is not counted twice). Paths are cut to the package
(`site-packages/` or the revision's export folder, `--strip`), and line numbers dropped, so the same function
in two checkouts compares.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

LINE = re.compile(r":\d+\)$")


def inclusive(path: str, strip: re.Pattern[str]) -> tuple[Counter[str], int]:
    """(samples whose stack holds each function, all samples)."""
    samples: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            total += n
            for name in {LINE.sub(")", strip.sub(" (", frame)) for frame in stack.split(";")}:
                samples[name] += n
    return samples, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("a_rps", type=float)
    p.add_argument("b")
    p.add_argument("b_rps", type=float)
    p.add_argument("--top", type=int, default=45, help="rows, largest increase first")
    p.add_argument("--labels", default="main,base", help="names of A and B in the header")
    p.add_argument("--strip", default=r" \(.*?/(site-packages|sw-[0-9a-f]+)/",
                   help="regex cut from each frame's path (default: site-packages and /tmp/sw-REV exports)")
    args = p.parse_args()
    strip = re.compile(args.strip)
    a, a_total = inclusive(args.a, strip)
    b, b_total = inclusive(args.b, strip)
    a_us, b_us = 1e6 / args.a_rps, 1e6 / args.b_rps
    rows = sorted(((a[k] / a_total * a_us, b[k] / b_total * b_us, k) for k in a.keys() | b.keys()),
                  key=lambda r: (r[0] - r[1], r[0], r[1], r[2]), reverse=True)
    label_a, label_b = args.labels.split(",")
    print(f"total us/req {label_a} {a_us:.0f} {label_b} {b_us:.0f}")
    for ua, ub, name in rows[: args.top]:
        print(f"{ua - ub:+7.1f} {ua:7.1f} {ub:7.1f}  {name[:150]}")


if __name__ == "__main__":
    main()
