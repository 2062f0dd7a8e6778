"""Fit the sim worker's timing model to a real engine's measurements and write a named profile (issue 14).

One command, from what bench/gpu_calibrate.py measured on a GPU to `sim-worker --profile NAME`:

    python -m turbofleet.worker.sim.fit CALIB.json --name turbomind-h200-1b5 --cache-tokens 1040000 \\
        [--token-scale 2.9 | --real-requests REAL.jsonl --sim-requests SIM.jsonl] [--out PATH] \\
        [--batched-prefill] [--gpu-share-requests REQ.jsonl ...]

The model (worker/sim/engine.py): a step costs
    prefill_ms_step [if it prefills] + prefill_ms_per_token * U + prefill_ms_per_token_ctx * U * P / 1000
    + prefill_ms_per_cached_token * (P - U)
    + decode_ms_base + decode_ms_per_seq * running
for U uncached prompt tokens of prompts P tokens long, admitted FIFO up to max_batch sequences and
max_prefill_tokens uncached tokens a step; a request's first token comes at the end of its admission step.
Fitted by least squares:
- decode_ms_base, decode_ms_per_seq: the mean inter-token interval of B concurrent streams against B;
- prefill_ms_step, prefill_ms_per_token, prefill_ms_per_token_ctx: an idle server's TTFT against the prompt
  length P (U = P), minus one decode step of one sequence;
- prefill_ms_per_cached_token: a cache hit's TTFT beyond the model's for its uncached tokens, per cached
  token (TurboMind's hits are not free: a 16k-token full hit took 37 % of a cold prefill on the H200). From
  `--hit-cost`: `full` (the same prompt again), `conversation` (a chat's next turn on an idle GPU, the
  calibration's "conversation" rows), `both` (all of them); default: conversation when the calibration has
  those rows, else full. With `--hit-curve`, a curve of the cached tokens instead of one slope: the median of
  each measured size, never falling (prefill_cached_ms_curve, worker/sim/hitcost.py);
- max_batch: from the max-batch probe (the largest jump in the sorted TTFTs of more streams than the engine
  runs), or --max-batch (the engine's setting, e.g. TurboMind's max_batch_size from its log).

Token scale: the sim counts its own (word) tokens, the engine real BPE tokens; the bench's text has about
`token_scale` real tokens per sim token, so per-token costs are multiplied by it (the context term by its
square), and token budgets (cache, max_prefill_tokens) divided by it. Give it, or let it be measured from the
same workload's per-request lines on the real fleet and on the sim (mean prompt tokens, real over sim).

Two optional terms (issue 14): `--batched-prefill` fits prefill_ms_per_token_batched (the prompts of a step
other than its longest cost that per token) from the calibration's several-prompts-at-once rows;
`--gpu-share-requests REQ.jsonl` (per-request lines of the real servers time-sharing one GPU) fits the
profile's "gpu_share" slowdown tables for `sim-worker --gpu-share` (gpu_share_from_requests below);
`--unshared-step` and `--ttft-offset` leave out of those ratios what does not stretch with the GPU's other
users (a prefill step's own cost; the time a TTFT spends off the GPU).

The fit's checks (printed, and stored in the profile): each measurement against what the fitted model
predicts for it, including the cache-hit and prefill-during-decode measurements, which the fit did not use.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import hitcost, profiles


def lstsq(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares by the normal equations (a handful of columns; no numpy needed)."""
    n = len(xs[0])
    a = [[sum(r[i] * r[j] for r in xs) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * y for r, y in zip(xs, ys, strict=True)) for i in range(n)]
    for c in range(n):  # Gauss-Jordan with partial pivoting
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p] = a[p], a[c]
        b[c], b[p] = b[p], b[c]
        if abs(a[c][c]) < 1e-12:
            continue
        for r in range(n):
            if r != c:
                f = a[r][c] / a[c][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c], strict=True)]
                b[r] -= f * b[c]
    return [b[i] / a[i][i] if abs(a[i][i]) > 1e-12 else 0.0 for i in range(n)]


def fit_decode(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(decode_ms_base, decode_ms_per_seq): a line through the mean inter-token interval against the batch.
    One refit without the points far off the first line (residual over 3x the median residual and over 1 ms),
    so one hiccup (a batch whose streams were stalled by something else) does not tilt it: the H200's batch
    of 64 once measured 36 ms between 5.3 ms at 32 and 18.5 ms at 128."""
    pts = [(float(r["batch"]), 1000.0 * r["itl_mean"]) for r in rows if r.get("itl_mean")]

    def line(ps: list[tuple[float, float]]) -> list[float]:
        return lstsq([[1.0, b] for b, _ in ps], [y for _, y in ps])

    base, per = line(pts)
    resid = [abs(y - base - per * b) for b, y in pts]
    cut = max(3.0 * sorted(resid)[len(resid) // 2], 1.0)
    kept = [p for p, r in zip(pts, resid, strict=True) if r <= cut]
    if len(kept) >= 3 and len(kept) < len(pts):
        base, per = line(kept)
    return max(0.0, base), max(0.0, per)


def fit_prefill(rows: list[dict[str, Any]], step1_ms: float) -> tuple[float, float, float]:
    """(prefill_ms_step, ms per token, ms per token per 1k context) from idle TTFTs."""
    pts = [(float(r["prompt"]), 1000.0 * r["ttft"] - step1_ms) for r in rows if r.get("ttft") and r.get("prompt")]
    c0, a, b = lstsq([[1.0, p, p * p / 1000.0] for p, _ in pts], [y for _, y in pts])
    if b < 0:  # no attention term visible: refit linear
        c0, a = lstsq([[1.0, p] for p, _ in pts], [y for _, y in pts])
        b = 0.0
    return max(0.0, c0), max(0.0, a), b


def max_batch_from_probe(probe: dict[str, Any]) -> int | None:
    t = probe.get("ttfts") or []
    if len(t) < 4:
        return None
    jumps = [(t[i + 1] - t[i], i + 1) for i in range(len(t) - 1)]
    gap, at = max(jumps)
    # a real admission wall is a jump well above the spread of the rest
    rest = sorted(j for j, _ in jumps)[len(jumps) // 2]
    return at if gap > 5 * max(rest, 1e-4) and at < len(t) else None


def token_scale_from(real: str, sim: str) -> float:
    def mean_prompt(path: str) -> float:
        lines = Path(path).read_text().splitlines()
        xs = [json.loads(line).get("prompt_tokens") or 0 for line in lines if line.strip()]
        xs = [x for x in xs if x]
        return sum(xs) / len(xs)

    return mean_prompt(real) / mean_prompt(sim)


def fit(
    calib: dict[str, Any],
    *,
    cache_tokens: int,
    token_scale: float,
    max_batch: int | None,
    block_size: int,
    max_prefill_tokens: int,
    hit_cost: str = "auto",
    hit_curve: bool = False,
) -> dict[str, Any]:
    base, per = fit_decode(calib["decode"])
    step_ms, a, b = fit_prefill(calib["prefill"], base + per)
    probe_batch = max_batch_from_probe(calib.get("max_batch_probe") or {})
    mb = max_batch or probe_batch or 256

    # a cache hit's cost: what the hits took beyond the model's TTFT of their uncached tokens, per cached
    # token (a least-squares slope through 0), or with `hit_curve` a curve of its cached tokens (the median
    # of each measured size, worker/sim/hitcost.py); ((kind, size), prompt, cached, TTFT ms) per hit
    full = [
        (("full", h["n"]), x["prompt_tokens"], x["cached_tokens"], 1000.0 * x["ttft"])
        for h in calib.get("hits") or []
        for x in (h["full"],)
        if x.get("ttft") and x.get("cached_tokens") and x.get("prompt_tokens")
    ]
    turns = [
        (("conversation", x["n"]), x["prompt_tokens"], x["cached_tokens"], 1000.0 * x["ttft"])
        for x in calib.get("conversation") or []
        if not x.get("busy") and x.get("ttft") and x.get("cached_tokens") and x.get("prompt_tokens")
    ]
    if hit_cost == "auto":
        hit_cost = "conversation" if turns else "full"
    pts = {"full": full, "conversation": turns, "both": full + turns}[hit_cost]

    def uncached_ms(u: float, p: float, running: int = 0) -> float:  # real tokens, ms; what cached ones add aside
        return step_ms + a * u + b * u * p / 1000.0 + base + per * (running + 1)

    hit_ms = 0.0
    curve: hitcost.Curve = ()
    if pts:
        extra = [(n, c, y - uncached_ms(max(p - c, 1), p)) for n, p, c, y in pts]
        hit_ms = max(0.0, sum(c * y for _, c, y in extra) / sum(c * c for _, c, _ in extra))
        if hit_curve:
            sizes: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for n, c, y in extra:
                sizes.setdefault(n, []).append((c, y))
            curve = hitcost.fit_curve(
                [(_median([c for c, _ in v]), _median([y for _, y in v])) for v in sizes.values()]
            )

    def hit_cost_ms(cached: float) -> float:  # real tokens
        return hitcost.curve_ms(curve, cached) if curve else hit_ms * cached

    def ttft_model(u: float, p: float, running: int = 0) -> float:  # real tokens, ms
        return uncached_ms(u, p, running) + hit_cost_ms(p - u)

    def hit_check(x: dict[str, Any]) -> dict[str, Any]:
        """A measured hit (or cold prompt) against the model: its cached tokens, real and model TTFT."""
        u = x["prompt_tokens"] - (x.get("cached_tokens") or 0)
        return {
            "cached": x.get("cached_tokens"),
            "real_ms": round(1000 * x["ttft"], 2),
            "model_ms": round(ttft_model(max(u, 1), x["prompt_tokens"]), 2),
        }

    checks: dict[str, Any] = {"prefill": [], "decode": [], "hits": [], "conversation": [], "mix": []}
    for r in calib["prefill"]:
        if r.get("ttft") and r.get("prompt"):
            checks["prefill"].append(
                {
                    "prompt": r["prompt"],
                    "real_ms": round(1000 * r["ttft"], 2),
                    "model_ms": round(ttft_model(r["prompt"], r["prompt"]), 2),
                }
            )
    for r in calib["decode"]:
        if r.get("itl_mean"):
            checks["decode"].append(
                {
                    "batch": r["batch"],
                    "real_ms": round(1000 * r["itl_mean"], 3),
                    "model_ms": round(base + per * r["batch"], 3),
                }
            )
    for h in calib.get("hits") or []:
        for k in ("cold", "full", "partial"):
            x = h[k]
            if x.get("ttft") and x.get("prompt_tokens"):
                checks["hits"].append({"n": h["n"], "kind": k, **hit_check(x)})
    for x in calib.get("conversation") or []:
        if x.get("ttft") and x.get("prompt_tokens"):
            checks["conversation"].append({"n": x["n"], "busy": x.get("busy", False), **hit_check(x)})
    for m in calib.get("mix") or []:
        if m.get("ttft") and m.get("prompt"):
            checks["mix"].append(
                {
                    "batch": m["batch"],
                    "prompt": m["prompt"],
                    "real_ttft_ms": round(1000 * m["ttft"], 2),
                    "model_ttft_ms": round(ttft_model(m["prompt"], m["prompt"], m["batch"]), 2),
                    "real_decoder_max_gap_ms": round(1000 * (m.get("decoder_max_gap") or 0), 2),
                }
            )
    contention = []
    single = {r["batch"]: r["itl_mean"] for r in calib["decode"] if r.get("itl_mean")}
    for c in calib.get("contention") or []:
        if c.get("itl_mean") and c.get("batch_each") in single:
            contention.append(
                {
                    "servers": c["servers"],
                    "batch_each": c["batch_each"],
                    "slowdown": round(c["itl_mean"] / single[c["batch_each"]], 3),
                }
            )
    r = token_scale
    engine: dict[str, Any] = {
        "max_batch": int(mb),
        "prefill_ms_per_token": round(a * r, 6),
        "prefill_ms_per_token_ctx": round(b * r * r, 8),
        "prefill_ms_step": round(step_ms, 4),
        "prefill_ms_per_cached_token": round(hit_ms * r, 8),
        "decode_ms_base": round(base, 4),
        "decode_ms_per_seq": round(per, 6),
        "max_prefill_tokens": max(1, round(max_prefill_tokens / r)),
        "block_size": block_size,
        "cache_blocks": max(1, round(cache_tokens / r / block_size)),
    }
    if curve:
        engine["prefill_cached_ms_curve"] = [[round(t / r, 1), m] for t, m in curve]
    return {
        "engine": engine,
        "fit": {
            "real_tokens": {
                "prefill_ms_per_token": a,
                "prefill_ms_per_token_ctx": b,
                "prefill_ms_step": step_ms,
                "prefill_ms_per_cached_token": hit_ms,
                **({"prefill_cached_ms_curve": [list(k) for k in curve]} if curve else {}),
                "hit_cost_from": hit_cost,
                "decode_ms_base": base,
                "decode_ms_per_seq": per,
                "cache_tokens": cache_tokens,
                "max_prefill_tokens": max_prefill_tokens,
            },
            "token_scale": token_scale,
            "max_batch_probe": probe_batch,
            "contention": contention,
        },
        "checks": checks,
    }


def fit_batched(
    multi: list[dict[str, Any]], rt: dict[str, float], max_prefill_tokens: int
) -> tuple[float, list[dict[str, Any]]]:
    """prefill_ms_per_token_batched (real tokens) from the calibration's "several prompts at once" rows (k
    prompts of `prompt` tokens sent together to an idle server): the per-token cost of the prompts of a step
    other than its longest that makes the sim's mean TTFT of each row closest to the measured one (a grid
    over 0 .. prefill_ms_per_token; the sim's admission: FIFO, a step takes prompts until max_prefill_tokens).
    Returns it and the check rows (real and model mean / max TTFT)."""
    a = rt["prefill_ms_per_token"]

    def ttfts(k: int, p: int, ab: float) -> list[float]:
        out: list[float] = []
        t, left = 0.0, k
        while left:
            n = 0
            while left and (n == 0 or n * p < max_prefill_tokens):
                n += 1
                left -= 1
            running = k - left
            t += (
                rt["prefill_ms_step"] + a * p + ab * p * (n - 1) + rt["prefill_ms_per_token_ctx"] * n * p * p / 1000.0
                + rt["decode_ms_base"] + rt["decode_ms_per_seq"] * running
            )
            out += [t] * n
        return out

    rows: list[tuple[int, int, list[float]]] = [
        (int(m["k"]), int(m["prompt"]), [1000.0 * float(x) for x in m["ttfts"]])
        for m in multi
        if m.get("ttfts") and m.get("k")
    ]
    if not rows:
        return a, []

    def err(ab: float) -> float:
        return float(sum((sum(ttfts(k, p, ab)) / k - sum(real) / len(real)) ** 2 for k, p, real in rows))

    best = min((a * i / 200.0 for i in range(201)), key=err)
    checks = [
        {
            "k": k,
            "prompt": p,
            "real_mean_ms": round(sum(real) / len(real), 2),
            "real_max_ms": round(max(real), 2),
            "model_mean_ms": round(sum(ttfts(k, p, best)) / k, 2),
            "model_max_ms": round(max(ttfts(k, p, best)), 2),
            "model_unbatched_mean_ms": round(sum(ttfts(k, p, a)) / k, 2),
        }
        for k, p, real in rows
    ]
    return best, checks


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2.0


def gpu_share_from_requests(
    rows: list[dict[str, Any]],
    rt: dict[str, Any],
    workers: int,
    samples: int = 10,
    unshared_step: bool = False,
    ttft_offset: bool = False,
) -> dict[str, Any]:
    """Slowdown tables for `sim-worker --gpu-share` from per-request lines (bench --requests-out) of servers
    time-sharing one GPU, against the fitted model `rt` (the profile's fit.real_tokens, real tokens, ms).

    A server is busy while it has a request between its start and its end. For each request, k = how many
    servers were busy (its own included; the mean over the interval, rounded) and the ratio of what it took
    to what the fitted model says it takes alone:
    - decode: its mean inter-token interval over decode_ms_base + decode_ms_per_seq * (its server's requests),
      for requests whose server prefilled nothing else while they decoded (the sim's steps pay for that);
    - prefill / cached: its TTFT over the model's TTFT, for requests nothing on their server was still
      prefilling ahead of (queueing is not contention); mostly uncached prompts make the prefill table,
      mostly cached ones the cached table.
    Rows are grouped by their "router" (and "_run", which tells several files' runs apart). Each table is
    the median ratio per k, 1.0 for k = 1 (the calibration is the alone cost), never below 1
    and never falling as k grows; a k with fewer than 5 requests takes the previous k's factor.

    `unshared_step`: a prefill step's own cost (prefill_ms_step) does not stretch with the GPU's other users
    (the server's own work around the kernels): the prefill and cached ratios leave it out of both sides, and
    the tables get a "step" table of 1.0. The calibration's conversation turns say so: a 2 k-token turn took
    about as long with the other three servers decoding as alone, an 8 k one about twice as long.

    `ttft_offset`: a TTFT holds time that is not the GPU's (the proxy, HTTP, the tokenizer), which sharing does
    not stretch and the model does not hold. Per part, the median of what the requests alone on the GPU (k = 1,
    at least 5 of them) took beyond the model is left out of every ratio of that part (never below 0). The sim
    pays its own such time as it runs. Without it, that time is stretched with the rest: stop 29 found the
    -step profile's multiround hits with all four servers busy 1.12-1.29x what six real runs took, alone
    1.00x."""
    by: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == 200 and r.get("worker") and r.get("ttft_ms") is not None:
            by.setdefault((r.get("_run"), r.get("router")), []).append(r)
    ratios: dict[str, dict[int, list[float]]] = {"prefill": {}, "cached": {}, "decode": {}}
    ttfts: dict[str, dict[int, list[tuple[float, float]]]] = {"prefill": {}, "cached": {}}  # (TTFT, model) ms
    curve = hitcost.check_curve(rt["prefill_cached_ms_curve"]) if rt.get("prefill_cached_ms_curve") else ()
    for rs in by.values():
        iv = [(r["start_s"], r["start_s"] + r["e2e_ms"] / 1000.0, r["worker"], r) for r in rs]

        def busy(t: float, iv: list[tuple[float, float, str, dict[str, Any]]] = iv) -> list[str]:
            return [w for s0, e0, w, _ in iv if s0 <= t < e0]

        for s0, e0, w, r in iv:
            first = s0 + r["ttft_ms"] / 1000.0
            n, cached = r.get("completion_tokens") or 0, r.get("cached_tokens") or 0
            stalled = any(  # a prefill on its own server meanwhile: the sim's step pays that itself
                x[2] == w and x[3] is not r and x[0] < e0 and x[0] + x[3]["ttft_ms"] / 1000.0 > first for x in iv
            )
            if n >= 8 and e0 > first and not stalled:
                ts = [first + (e0 - first) * (i + 0.5) / samples for i in range(samples)]
                act = [busy(t) for t in ts]
                k = round(sum(len(set(a)) for a in act) / samples)
                b = sum(a.count(w) for a in act) / samples
                per_tok = (e0 - first) * 1000.0 / (n - 1)
                alone = rt["decode_ms_base"] + rt["decode_ms_per_seq"] * b
                ratios["decode"].setdefault(k, []).append(per_tok / alone)
            if any(x[2] == w and x[3] is not r and x[0] <= s0 < x[0] + x[3]["ttft_ms"] / 1000.0 for x in iv):
                continue  # queued behind a prefill on its own server
            p = float(r["prompt_tokens"])
            u = p - cached
            step = rt["prefill_ms_step"] if unshared_step else 0.0
            hit = hitcost.curve_ms(curve, cached) if curve else rt["prefill_ms_per_cached_token"] * cached
            model = (
                rt["prefill_ms_step"] - step
                + rt["prefill_ms_per_token"] * u
                + rt["prefill_ms_per_token_ctx"] * u * p / 1000.0
                + hit
                + rt["decode_ms_base"]
                + rt["decode_ms_per_seq"]
            )
            ts = [s0 + (first - s0) * (i + 0.5) / samples for i in range(samples)]
            k = round(sum(len(set(busy(t)) | {w}) for t in ts) / samples)
            part = "prefill" if u >= p / 2 else "cached"
            ttfts[part].setdefault(k, []).append((r["ttft_ms"] - step, model))
    offsets: dict[str, float] = {}
    for part, by_k in ttfts.items():
        alone = by_k.get(1, [])
        off = max(0.0, _median([y - m for y, m in alone])) if ttft_offset and len(alone) >= 5 else 0.0
        offsets[part] = round(off, 3)
        for k, ys in by_k.items():
            ratios[part][k] = [max(y - off, 0.0) / m for y, m in ys]
    out: dict[str, Any] = {}
    for part, per_k in ratios.items():
        table = [1.0]
        for k in range(2, workers + 1):
            xs = per_k.get(k, [])
            f = _median(xs) if len(xs) >= 5 else table[-1]
            table.append(round(max(table[-1], f), 2))
        out[part] = table
    if unshared_step:
        out["step"] = [1.0] * workers
    if ttft_offset:
        out["offset_ms"] = offsets
    out["samples"] = {part: {str(k): len(v) for k, v in sorted(per_k.items())} for part, per_k in ratios.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("calib", help="the JSON bench/gpu_calibrate.py wrote")
    ap.add_argument("--name", required=True, help="profile name, e.g. turbomind-h200-1b5")
    ap.add_argument("--cache-tokens", type=int, required=True, help="one server's KV cache in tokens (its log)")
    ap.add_argument("--token-scale", type=float, help="real tokens per sim token of the bench's text")
    ap.add_argument("--real-requests", help="--requests-out of a workload on the real fleet (for the token scale)")
    ap.add_argument("--sim-requests", help="--requests-out of the same workload on the sim")
    ap.add_argument("--max-batch", type=int, help="the engine's max batch (default: from the probe, else 256)")
    ap.add_argument("--max-prefill-tokens", type=int, default=8192, help="real tokens prefilled a step (8192)")
    ap.add_argument("--block-size", type=int, default=64, help="sim cache block in sim tokens (64)")
    ap.add_argument("--source", default="", help="free text: where and how it was measured")
    ap.add_argument(
        "--slowdown",
        type=float,
        default=1.0,
        help="multiply every fitted cost by this (e.g. the measured slowdown of several servers time-sharing one "
        "GPU, the fit's 'contention' entries; default 1)",
    )
    ap.add_argument(
        "--gpu-share-requests",
        action="append",
        default=[],
        metavar="REQ.jsonl",
        help="per-request lines (bench --requests-out) of the real servers time-sharing one GPU: fit the "
        "profile's gpu_share slowdown tables from them (sim-worker --gpu-share; repeatable)",
    )
    ap.add_argument(
        "--batched-prefill",
        action="store_true",
        help="fit prefill_ms_per_token_batched from the calibration's several-prompts-at-once rows (the other "
        "prompts of a step cost that per token instead of prefill_ms_per_token)",
    )
    ap.add_argument(
        "--hit-cost",
        choices=("auto", "full", "conversation", "both"),
        default="auto",
        help="which calibration hits set the cost of a cached token: the same prompt again (full), a chat's next "
        "turn on an idle GPU (conversation), or all; auto: conversation when measured, else full",
    )
    ap.add_argument(
        "--hit-curve",
        action="store_true",
        help="fit a hit's cost as a curve of its cached tokens (the median of each measured size, never falling; "
        "prefill_cached_ms_curve) instead of one slope through 0",
    )
    ap.add_argument("--gpu-share-workers", type=int, default=4, help="servers on the one GPU (4)")
    ap.add_argument("--unshared-step", action="store_true",
                    help="with --gpu-share-requests: a prefill step's own cost does not stretch with the GPU's other "
                    "users (see gpu_share_from_requests)")
    ap.add_argument("--ttft-offset", action="store_true",
                    help="with --gpu-share-requests: leave what requests alone on the GPU took beyond the model (time "
                    "not the GPU's) out of the prefill and cached ratios (see gpu_share_from_requests)")
    ap.add_argument("--out", help="where to write (default worker/sim/profiles/NAME.json)")
    args = ap.parse_args(argv)
    calib = json.loads(Path(args.calib).read_text())
    if args.token_scale:
        scale = args.token_scale
    elif args.real_requests and args.sim_requests:
        scale = token_scale_from(args.real_requests, args.sim_requests)
    else:
        ap.error("give --token-scale or both --real-requests and --sim-requests")
    prof = fit(
        calib,
        cache_tokens=args.cache_tokens,
        token_scale=scale,
        max_batch=args.max_batch,
        block_size=args.block_size,
        max_prefill_tokens=args.max_prefill_tokens,
        hit_cost=args.hit_cost,
        hit_curve=args.hit_curve,
    )
    prof = {
        "name": args.name,
        "source": args.source,
        "fitted_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        **prof,
    }
    if args.slowdown != 1.0:
        for k in ("prefill_ms_per_token", "prefill_ms_per_token_ctx", "prefill_ms_step", "prefill_ms_per_cached_token",
                  "decode_ms_base", "decode_ms_per_seq"):
            prof["engine"][k] = round(prof["engine"][k] * args.slowdown, 8)
        if "prefill_cached_ms_curve" in prof["engine"]:
            prof["engine"]["prefill_cached_ms_curve"] = [
                [t, round(m * args.slowdown, 3)] for t, m in prof["engine"]["prefill_cached_ms_curve"]
            ]
        prof["fit"]["slowdown_applied"] = args.slowdown
    if args.batched_prefill:
        rt = prof["fit"]["real_tokens"]
        ab, rows_b = fit_batched(calib.get("multi") or [], rt, args.max_prefill_tokens)
        rt["prefill_ms_per_token_batched"] = ab
        prof["engine"]["prefill_ms_per_token_batched"] = round(ab * scale * args.slowdown, 8)
        prof["checks"]["batched"] = rows_b
    if args.gpu_share_requests:
        rows = [
            {**json.loads(line), "_run": i}
            for i, f in enumerate(args.gpu_share_requests)
            for line in Path(f).read_text().splitlines()
            if line
        ]
        share = gpu_share_from_requests(rows, prof["fit"]["real_tokens"], args.gpu_share_workers,
                                        unshared_step=args.unshared_step, ttft_offset=args.ttft_offset)
        prof["fit"]["gpu_share_samples"] = share.pop("samples")
        if "offset_ms" in share:
            prof["fit"]["gpu_share_ttft_offset_ms"] = share.pop("offset_ms")
        prof["fit"]["gpu_share_requests"] = args.gpu_share_requests
        prof["gpu_share"] = share
    out = Path(args.out) if args.out else profiles.DIR / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof, indent=1) + "\n")
    e = prof["engine"]
    print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in e.items()))
    for kind, rows in prof["checks"].items():
        for row in rows:
            print(f"  check {kind}: {row}")
    for c in prof["fit"]["contention"]:
        print(f"  contention: {c}")
    if "gpu_share" in prof:
        print(f"  gpu_share: {prof['gpu_share']} (requests per busy count: {prof['fit']['gpu_share_samples']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
