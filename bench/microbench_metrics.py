"""Issue 12: the per-request metrics cost before (the hand-written metrics.py of an older checkout) and after
(the prometheus-client facade plus the observe hooks' token counters), in one process, min of 7 repeats; and
the cost of one JSON request-log line.

    python -m turbofleet.bench.microbench_metrics OLD_CHECKOUT/proxy/metrics.py
"""

from __future__ import annotations

import importlib.util
import io
import logging
import sys
import timeit
from types import ModuleType
from typing import Any

from turbofleet.proxy import metrics as new
from turbofleet.proxy import reqlog


def load(path: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


W, R, M = "http://127.0.0.1:23333", "/v1/chat/completions", "qwen"


def before(m: Any) -> None:
    m.inc("turbofleet_route_decisions_total", reason="pin")
    m.observe("turbofleet_ttft_seconds", 0.042)
    m.inc("turbofleet_upstream_tries_total", outcome="ok")
    m.inc("turbofleet_requests_total", route=R, status="200")
    m.observe("turbofleet_request_seconds", 0.8)


def after(m: Any) -> None:
    m.inc("turbofleet_route_decisions_total", reason="pin")
    m.observe("turbofleet_ttft_seconds", 0.042, worker=W)
    m.inc("turbofleet_upstream_tries_total", worker=W, outcome="ok")
    m.inc("turbofleet_prompt_tokens_total", 1830, worker=W, model=M)
    m.inc("turbofleet_cached_tokens_total", 1792, worker=W, model=M)
    m.inc("turbofleet_completion_tokens_total", 96, worker=W, model=M)
    m.inc("turbofleet_requests_total", route=R, model=M, status="200")
    m.observe("turbofleet_request_seconds", 0.8, model=M)


def main() -> None:
    old = load(sys.argv[1], "old_metrics")
    n = 50_000
    mo, mn = old.Metrics(), new.Metrics()
    tb = min(timeit.repeat(lambda: before(mo), number=n, repeat=7)) / n
    ta = min(timeit.repeat(lambda: after(mn), number=n, repeat=7)) / n
    print(f"metrics per request: before {tb * 1e6:.2f} us (5 calls), after {ta * 1e6:.2f} us (8 calls), "
          f"ratio {ta / tb:.2f}")
    rec = logging.LogRecord("turbofleet.requests", logging.INFO, __file__, 1, "request", None, None)
    rec.fields = {"request_id": "req-7f3a", "method": "POST", "path": R, "model": M, "tenant": "team-a",
                  "key_id": "k-12ab", "worker": W, "route": "pin", "status": 200, "ttft_ms": 41.2, "duration_ms": 812.5,
                  "prompt_tokens": 1830, "cached_tokens": 1792, "completion_tokens": 96, "tries": 1}
    h = logging.StreamHandler(io.StringIO())
    h.setFormatter(reqlog.JsonFormatter())
    tl = min(timeit.repeat(lambda: h.emit(rec), number=n, repeat=7)) / n
    print(f"one JSON request-log line (format + write): {tl * 1e6:.2f} us")


if __name__ == "__main__":
    main()
