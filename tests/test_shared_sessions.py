"""Issue 18 item 5: two proxy replicas sharing Redis place new sessions as evenly as one.

Each replica counts the active sessions it placed per worker; it now publishes them with its in-flight counts
and places new sessions on the fleet-wide count. The case that shows it: replica A places 30 sessions on
three workers, a fourth worker joins, then replica B places 30 more. A replica that knows only its own
sessions spreads its 30 evenly (w4 ends with ~8 against ~18 on the others); on the fleet's count B fills w4
first, as one replica would: 15 each.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from tests.procs_kit import Proc, http_json, start_proxy, start_sim, wait_until
from tests.redis_kit import RedisServer
from turbofleet.balancer.kv_aware import KvAware
from turbofleet.balancer.policy import RouteRequest, WorkerView
from turbofleet.proxy.registry.keys import SESSIONS_FIELD

PREFIX = "shared-sessions"


@pytest.fixture
def sims(tmp_path: Path) -> Iterator[list[Proc]]:
    procs = [start_sim(tmp_path, name=f"sim{i}", extra=["--instant"]) for i in range(4)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def _add(proxy: Proc, sim: Proc) -> None:
    code, body = http_json("POST", proxy.url + "/nodes/add",
                           {"url": sim.url, "status": {"models": ["sim-model"], "role": 1}})
    assert code == 200, body


def _ready(proxy: Proc) -> set[str]:
    st = http_json("GET", proxy.url + "/nodes/status")[1]
    return {u for u, s in st.items() if s["state"] == "ready"}


def _where(proxy: Proc, name: str) -> str:
    import json
    import urllib.request

    req = urllib.request.Request(proxy.url + "/v1/chat/completions", method="POST", data=json.dumps(
        {"model": "sim-model", "max_tokens": 1, "messages": [{"role": "user", "content": f"conversation {name}"}]}
    ).encode(), headers={"Content-Type": "application/json", "X-Session-ID": name})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()
        return str(r.headers["X-Turbofleet-Worker"])


def _published_sessions(redis: RedisServer, replica: str) -> int:
    r = redis_lib.Redis(port=redis.port, decode_responses=True)
    try:
        fields = r.hgetall(f"{PREFIX}:inflight:{replica}")
    finally:
        r.close()
    return sum(int(v) for k, v in fields.items() if str(k).startswith(SESSIONS_FIELD))


def _others_sessions(proxy: Proc) -> int:
    """The sessions the proxy knows other replicas placed, over the fleet (its /nodes/status)."""
    return sum(int(s["others_sessions"]) for s in http_json("GET", proxy.url + "/nodes/status")[1].values())


def test_two_replicas_place_sessions_as_evenly_as_one(tmp_path: Path, redis_server: RedisServer,
                                                      sims: list[Proc]) -> None:
    args = ["--registry", redis_server.url, "--registry-prefix", PREFIX, "--policy", "kv_aware"]
    a = start_proxy(tmp_path, [*args, "--replica-id", "A"], name="A")
    b = start_proxy(tmp_path, [*args, "--replica-id", "B"], name="B")
    try:
        for s in sims[:3]:
            _add(a, s)
        wait_until(lambda: len(_ready(a)) == 3 and len(_ready(b)) == 3, 15, what="three workers at both")
        placed = collections.Counter(_where(a, f"a{i}") for i in range(30))
        assert sorted(placed.values()) == [10, 10, 10], placed
        _add(a, sims[3])
        wait_until(lambda: len(_ready(a)) == 4 and len(_ready(b)) == 4, 15, what="the fourth worker at both")
        # A's counts reach Redis with its next lease refresh (every 2 s), and B reads them every 0.2 s
        # (bounded, not asserted: without sharing they never come, and the placement below shows it)
        deadline = time.monotonic() + 6
        while _published_sessions(redis_server, "A") < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
        if _published_sessions(redis_server, "A") >= 30:  # B's /nodes/status shows when it has read them
            wait_until(lambda: _others_sessions(b) >= 30, 5, what="B to read A's 30 sessions")
        placed.update(_where(b, f"b{i}") for i in range(30))
    finally:
        a.stop()
        b.stop()
    counts = sorted(placed[s.url] for s in sims)
    # as one replica places them: 15 each (one off at most where ties fall)
    print("sessions per worker, A then B:", counts)
    assert counts[-1] - counts[0] <= 2, placed


def _views(n: int, others: dict[str, int] | None = None) -> list[WorkerView]:
    return [WorkerView(id=f"w{i}", models=frozenset({"m"}), sessions=(others or {}).get(f"w{i}", 0))
            for i in range(n)]


def test_kv_aware_adds_other_replicas_sessions() -> None:
    """Pure: a policy that placed nothing itself avoids the workers other replicas filled with sessions."""
    p = KvAware()
    views = _views(4, {"w0": 10, "w1": 10, "w2": 10})
    got = collections.Counter(p.choose(RouteRequest(model="m", session_key=f"s{i}"), views).worker_id
                              for i in range(30))
    total = {w: got[w] + {"w0": 10, "w1": 10, "w2": 10}.get(w, 0) for w in ("w0", "w1", "w2", "w3")}
    assert got["w3"] >= 10 and max(total.values()) - min(total.values()) <= 1, (got, total)
    alone = KvAware()
    spread = collections.Counter(alone.choose(RouteRequest(model="m", session_key=f"s{i}"), _views(4)).worker_id
                                 for i in range(30))
    assert max(spread.values()) - min(spread.values()) <= 1, spread
