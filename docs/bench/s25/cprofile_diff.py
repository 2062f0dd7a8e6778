"""Stop 25: two steady-state cProfiles (steady_cprofile.sh) side by side, per request: calls and self time
of every function, the largest differences each way (--top of each). Paths are cut to the part inside the
tree or site-packages, so two trees' functions meet.

    python docs/bench/s25/cprofile_diff.py A.out N_A B.out N_B [--top 40]
"""

from __future__ import annotations

import argparse
import pstats


def per_function(path: str) -> dict[tuple[str, str], list[float]]:
    """(file, function) -> [calls, self seconds, cumulative seconds], summed over same-named entries."""
    out: dict[tuple[str, str], list[float]] = {}
    for (file, _line, name), (_cc, calls, tt, ct, _callers) in pstats.Stats(path).stats.items():  # type: ignore[attr-defined]
        if "/steady-prof-" in file:
            file = file.split("/steady-prof-", 1)[1].split("/", 1)[-1]
        else:
            file = file.split("site-packages/")[-1].split("python3.11/")[-1].split("python3.12/")[-1]
        row = out.setdefault((file, name), [0.0, 0.0, 0.0])
        row[0] += calls
        row[1] += tt
        row[2] += ct
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("n_a", type=int, help="requests answered while A was profiled")
    p.add_argument("b")
    p.add_argument("n_b", type=int)
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    a, b = per_function(args.a), per_function(args.b)
    for label, d, n in (("A", a, args.n_a), ("B", b, args.n_b)):
        calls = sum(r[0] for r in d.values()) / n
        self_us = sum(r[1] for r in d.values()) / n * 1e6
        print(f"{label}: {calls:.0f} calls and {self_us:.0f} µs (under cProfile) per request")
    zero = [0.0, 0.0, 0.0]
    rows = []
    for key in a.keys() | b.keys():
        ra, rb = a.get(key, zero), b.get(key, zero)
        rows.append((ra[1] / args.n_a * 1e6 - rb[1] / args.n_b * 1e6, ra[0] / args.n_a - rb[0] / args.n_b,
                     ra[1] / args.n_a * 1e6, rb[1] / args.n_b * 1e6, key))
    rows.sort(reverse=True)
    print(f"{'self µs A-B':>11} {'calls A-B':>9} {'A µs':>7} {'B µs':>7}  function")
    more = rows[: args.top]
    less = [r for r in reversed(rows[args.top:]) if r[0] < 0][: args.top]
    for title, part in (("A spends more", more), ("A spends less", less)):
        print(f"--- {title}")
        for d_us, d_calls, us_a, us_b, (file, name) in part:
            print(f"{d_us:+11.1f} {d_calls:+9.1f} {us_a:7.1f} {us_b:7.1f}  {file[-45:]}:{name}")


if __name__ == "__main__":
    main()
