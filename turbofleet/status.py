"""`turbofleet status --proxy URL [--watch [S]]`: the dashboard's view in a terminal, for an operator on SSH.

It reads the proxy's `/admin/fleet` (the document the web dashboard draws) over HTTP and prints the fleet line,
one table row per worker and the routing decisions. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

NONE = "-"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proxy", default="http://127.0.0.1:8000", help="the proxy's URL (default %(default)s)")
    parser.add_argument("--admin-token", default=None,
                        help="the proxy's admin token (default: TURBOFLEET_ADMIN_TOKEN when set)")
    parser.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")
    parser.add_argument("--count", type=int, default=0, help="with --watch: stop after this many views (0: never)")
    parser.add_argument("--json", action="store_true", help="print /admin/fleet's document as it is")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the proxy (default 5)")


def fetch(url: str, token: str | None, timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url.rstrip("/") + "/admin/fleet", headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        doc = json.loads(resp.read())
    if not isinstance(doc, dict):
        raise ValueError("/admin/fleet did not answer a JSON object")
    return doc


# ---- formats (the web page's, in ASCII)
def _pct(v: Any) -> str:
    return NONE if v is None else f"{v * 100:.1f}%"


def _ms(v: Any) -> str:
    return NONE if v is None else f"{v * 1000:.1f}ms"


def _rate(v: Any) -> str:
    return NONE if v is None else f"{v:.2f}"


def _int(v: Any) -> str:
    return NONE if v is None else str(round(v))


def table(rows: Sequence[Sequence[str]], right: frozenset[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append("  ".join(cells).rstrip())
    return out


def render(doc: dict[str, Any]) -> str:
    f = doc["fleet"]
    reg = f.get("registry") or {}
    registry = f"{reg.get('backend')}" + ("" if reg.get("reachable") else " UNREACHABLE")
    if reg.get("stale_s"):
        registry += f" ({float(reg['stale_s']):.1f}s stale)"
    queue = NONE if f.get("queue_depth") is None else str(f["queue_depth"])
    lines = [
        f"turbofleet  policy {doc.get('policy')}  up {doc.get('uptime_s')}s  registry {registry}",
        f"fleet (last {round(f['window_s'])}s): {_rate(f['requests_per_s'])} req/s  "
        f"TTFT p50 {_ms(f['ttft_p50_s'])} p99 {_ms(f['ttft_p99_s'])}  errors {_pct(f['error_rate'])}  "
        f"hit {_pct(f['hit_rate'])}  in flight {f['in_flight']}  queued {queue}  "
        f"ready {f['ready_workers']}/{f['workers']}",
        "",
    ]
    head = ["WORKER", "MODELS", "STATE", "INFL", "WAIT", "KV", "HIT", "P50", "P99", "REQ/S", "EJ", "HEARTBEAT",
            "WHY OUT"]
    rows = [head]
    for w in doc["workers"]:
        hb = w.get("heartbeat_age_s")
        rows.append([
            w["url"], ",".join(w["models"]), w["state"], _int(w["in_flight"]), _int(w["waiting"]),
            _pct(w["kv_usage"]), _pct(w["hit_rate"]), _ms(w["ttft_p50_s"]), _ms(w["ttft_p99_s"]),
            _rate(w["requests_per_s"]), _int(w["ejections"]), NONE if hb is None else f"{hb:.1f}s ago",
            w.get("reason") or "",
        ])
    if len(rows) == 1:
        lines.append("no workers registered")
    else:
        lines += table(rows, frozenset({3, 4, 5, 6, 7, 8, 9, 10}))
    r = doc["routing"]
    decisions = ", ".join(f"{k} {_int(v)}" for k, v in sorted(r["decisions"].items(), key=lambda kv: -kv[1]))
    lines.append("")
    pinned = NONE if r.get("pinned_sessions") is None else str(r["pinned_sessions"])
    lines.append(f"routing (last {round(r['window_s'])}s): {decisions or 'none'}; pinned sessions {pinned}")
    failures = [f"retry {k} {_int(v)}" for k, v in r.get("retries", {}).items()]
    failures += [f"ejected {k} {_int(v)}" for k, v in r.get("ejections", {}).items()]
    if failures:
        lines.append("failures: " + ", ".join(failures))
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    token = args.admin_token or os.environ.get("TURBOFLEET_ADMIN_TOKEN")
    shown = 0
    clear = args.watch is not None and out.isatty()
    while True:
        try:
            doc = fetch(args.proxy, token, args.timeout)
            text = json.dumps(doc, indent=2) + "\n" if args.json else render(doc)
        except urllib.error.HTTPError as e:
            with e:
                hint = " (pass --admin-token)" if e.code in (401, 403) else ""
                text = f"turbofleet status: {args.proxy} answered {e.code}{hint}\n"
            if args.watch is None:
                out.write(text)
                return 1
        except (urllib.error.URLError, OSError, ValueError) as e:
            text = f"turbofleet status: cannot read {args.proxy}/admin/fleet: {e}\n"
            if args.watch is None:
                out.write(text)
                return 1
        if clear:
            out.write("\x1b[H\x1b[2J")
        out.write(text)
        out.flush()
        shown += 1
        if args.watch is None or (args.count and shown >= args.count):
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
