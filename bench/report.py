"""Plain-text tables of bench results."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], align_left: int = 1) -> str:
    """Left-align the first `align_left` columns, right-align the rest."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < align_left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def errors_text(s: Mapping[str, Any]) -> str:
    kinds = s.get("errors_by_kind") or {}
    if not kinds:
        return str(s.get("errors", 0))
    return f"{s['errors']} (" + ", ".join(f"{k}:{v}" for k, v in sorted(kinds.items())) + ")"


def single(s: Mapping[str, Any]) -> str:
    """One run as a two-column table."""
    t, i, e = s["ttft_ms"], s["itl_ms"], s["e2e_ms"]
    rows = [
        ("requests (ok)", f"{s['requests']} ({s['ok']})"),
        ("errors", errors_text(s)),
        ("duration s", _f(s["duration_s"], 2)),
        ("requests/s", _f(s["requests_per_s"], 2)),
        ("output tokens/s", _f(s["output_tokens_per_s"], 1)),
        ("TTFT ms p50 / p90 / p99 / mean", f"{_f(t['p50'])} / {_f(t['p90'])} / {_f(t['p99'])} / {_f(t['mean'])}"),
        ("ITL ms p50 / p90 / p99", f"{_f(i['p50'], 2)} / {_f(i['p90'], 2)} / {_f(i['p99'], 2)}"),
        ("e2e ms p50 / p90 / p99", f"{_f(e['p50'])} / {_f(e['p90'])} / {_f(e['p99'])}"),
        (
            "prompt / cached / output tokens",
            f"{s['prompt_tokens']:,} / {s['cached_tokens']:,} / {s['output_tokens']:,}",
        ),
        ("prefix-cache hit rate", _f(s["hit_rate"] * 100, 1) + " %"),
    ]
    if s.get("hit_rate_upper_bound") is not None:
        rows.append(("hit-rate upper bound (trace)", _f(s["hit_rate_upper_bound"] * 100, 1) + " %"))
    if s.get("workers"):
        per = ", ".join(f"{k}: {_f(v, 0) if isinstance(v, float) else v}" for k, v in sorted(s["workers"].items()))
        rows.append(("requests per worker", per))
        rows.append(("imbalance max/mean", _f(s.get("imbalance"), 2)))
    return table(["metric", "value"], rows, align_left=2)


def compare(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """Routers side by side, one row each."""
    headers = [
        "router",
        "ok",
        "errors",
        "TTFT p50",
        "TTFT p99",
        "TTFT mean",
        "ITL p50",
        "e2e p50",
        "req/s",
        "tok/s",
        "hit %",
        "imbal",
        "rtr cpu s",
        "own %",
        "busy %",
    ]
    rows = []
    for name, s in runs.items():
        if "skipped" in s:
            rows.append([name, "-", f"skipped: {s['skipped']}", *["-"] * (len(headers) - 3)])
            continue
        cpu = s.get("cpu") or {}
        rows.append(
            [
                name,
                str(s["ok"]),
                errors_text(s),
                _f(s["ttft_ms"]["p50"]),
                _f(s["ttft_ms"]["p99"]),
                _f(s["ttft_ms"]["mean"]),
                _f(s["itl_ms"]["p50"], 2),
                _f(s["e2e_ms"]["p50"]),
                _f(s["requests_per_s"], 2),
                _f(s["output_tokens_per_s"], 0),
                _f(s["hit_rate"] * 100, 1),
                _f(s.get("imbalance"), 2),
                _f(cpu.get("router_s"), 1),
                _f(cpu["own_share"] * 100, 0) if cpu.get("own_share") is not None else "-",
                _f(s["cpu_busy"] * 100, 0) if s.get("cpu_busy") is not None else "-",
            ]
        )
    return table(headers, rows) + (
        "\n(latencies in ms; imbal = max/mean requests per worker; rtr cpu s = CPU seconds the router used;"
        "\n own % = router + workers + client CPU over all cores; busy % = whole machine, other loads included)"
    )


def overhead(rows: Sequence[Mapping[str, Any]]) -> str:
    headers = ["router", "mode", "req/s", "p50 ms", "p99 ms", "errors", "cpu µs/req", "tool"]
    out = []
    for r in rows:
        if "skipped" in r:
            out.append(
                [r["router"], "stream" if r.get("stream") else "json", f"skipped: {r['skipped']}", "-", "-", "-", "-",
                 "-"]
            )
            continue
        out.append(
            [
                r["router"],
                "stream" if r.get("stream") else "json",
                _f(r["requests_per_s"], 0),
                _f(r["p50_ms"], 2),
                _f(r["p99_ms"], 2),
                str(r.get("errors", 0)),
                _f(r.get("router_cpu_us_per_req"), 0),
                r.get("tool", ""),
            ]
        )
    return table(headers, out)
