"""A cache hit's cost as a curve of its cached tokens (issue 14): `sim-worker --prefill-cached-ms-curve`.

TurboMind's hits are not free, and their cost is not one slope either. The calibration's conversation turns
(docs/GPU.md, stop 29) took about 13 ms beyond the uncached model at 2 k, 4 k and 8 k cached tokens, and 46 ms
at 16 k. A slope through 0 fitted to those four sizes is dominated by the 16 k turns: its model took 31 ms
for the 8 k turns that took 24.5 on the GPU.

The curve is a few knots (cached tokens, ms), read as a line through (0, 0) and the knots. Past the last knot
it goes on at that knot's mean cost per token (ms / tokens), so a hit longer than any measured one is charged
what the longest measured one cost per token, not a flat segment's zero.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

Curve = tuple[tuple[float, float], ...]


def parse_curve(text: str) -> Curve:
    """'2048:13.4,16448:46.1' -> ((2048.0, 13.4), (16448.0, 46.1)); raises ValueError unless the tokens rise,
    are > 0 and the ms are >= 0."""
    pts: list[tuple[float, float]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        tok, sep, ms = part.partition(":")
        try:
            if not sep:
                raise ValueError
            pts.append((float(tok), float(ms)))
        except ValueError:
            raise ValueError(f"hit-cost curve {text!r}: give TOKENS:MS pairs, comma-separated") from None
    return check_curve(pts)


def check_curve(points: Sequence[Sequence[float]]) -> Curve:
    """The knots as a Curve; raises ValueError on an empty curve, tokens that do not rise from > 0, or ms < 0."""
    pts = tuple((float(t), float(m)) for t, m in points)
    if not pts or any(t <= 0 or m < 0 for t, m in pts) or any(b[0] <= a[0] for a, b in itertools.pairwise(pts)):
        raise ValueError(f"hit-cost curve {list(pts)}: knots need rising tokens > 0 and ms >= 0")
    return pts


def format_curve(curve: Curve) -> str:
    return ",".join(f"{t:g}:{m:g}" for t, m in curve)


def curve_ms(curve: Curve, cached: float) -> float:
    """The ms a hit of `cached` tokens costs on the curve (0 for no cached token or an empty curve)."""
    if not curve or cached <= 0:
        return 0.0
    t0, m0 = 0.0, 0.0
    for t1, m1 in curve:
        if cached <= t1:
            return m0 + (m1 - m0) * (cached - t0) / (t1 - t0)
        t0, m0 = t1, m1
    return cached * m0 / t0


def fit_curve(groups: Sequence[tuple[float, float]]) -> Curve:
    """Knots from (cached tokens, extra ms) medians, one per measured size: sorted by tokens and made
    non-decreasing by pooling adjacent violators (a longer hit never costs less), each at least 0."""
    blocks: list[list[float]] = []  # [sum of ms, count, first index]
    pts = sorted((float(t), max(0.0, float(m))) for t, m in groups if t > 0)
    for i, (_, m) in enumerate(pts):
        blocks.append([m, 1.0, float(i)])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n, _ = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out: list[tuple[float, float]] = []
    for s, n, first in blocks:
        for j in range(int(first), int(first + n)):
            t = pts[j][0]
            if out and out[-1][0] == t:
                continue
            out.append((t, round(s / n, 3)))
    return tuple(out)
