"""`turbofleet status`: the dashboard's document as a terminal table, once or with --watch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.procs_kit import ROOT, free_port, http_json, openai_client, start_proxy, start_sim, wait_until

MODEL = "sim-model"


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "turbofleet", "status", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_status_prints_every_worker_with_the_endpoints_numbers(tmp_path: Path) -> None:
    sims = [start_sim(tmp_path, MODEL) for _ in range(2)]
    proxy = start_proxy(tmp_path, ["--admin-token", "tok", *[a for s in sims for a in ("--worker", s.url)]])
    try:
        auth = {"Authorization": "Bearer tok"}
        wait_until(lambda: len(http_json("GET", proxy.url + "/admin/fleet", headers=auth)[1]["workers"]) == 2,
                   what="2 workers")
        c = openai_client(proxy.url + "/v1")
        for i in range(6):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q {i} " * 30}],
                                      max_tokens=2, extra_headers={"X-Session-ID": f"s{i % 3}"})
        denied = status("--proxy", proxy.url)
        assert denied.returncode == 1 and "answered 401" in denied.stdout and "--admin-token" in denied.stdout
        done = status("--proxy", proxy.url, "--admin-token", "tok")
        assert done.returncode == 0, done.stderr
        doc = http_json("GET", proxy.url + "/admin/fleet", headers=auth)[1]
        lines = done.stdout.splitlines()
        assert lines[0].startswith("turbofleet  policy kv_aware")
        assert "ready 2/2" in lines[1] and "errors 0.0%" in lines[1]
        assert lines[3].split() == ["WORKER", "MODELS", "STATE", "INFL", "WAIT", "KV", "HIT", "P50", "P99", "REQ/S",
                                    "EJ", "HEARTBEAT", "WHY", "OUT"]
        for w in doc["workers"]:
            (row,) = [ln.split() for ln in lines if ln.startswith(w["url"] + " ")]
            assert row[1:5] == [MODEL, "ready", "0", "0"]
            assert row[6] == f"{w['hit_rate'] * 100:.1f}%"  # cached/prompt tokens: they do not move when idle
            assert row[10] == "0"
        assert "pinned sessions 3" in done.stdout and "routing (last" in done.stdout
        watched = subprocess.run([sys.executable, "-m", "turbofleet", "status", "--proxy", proxy.url, "--watch",
                                  "0.1", "--count", "3"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                                 env={"TURBOFLEET_ADMIN_TOKEN": "tok", "PATH": "/usr/bin:/bin"})
        assert watched.returncode == 0 and watched.stdout.count("turbofleet  policy") == 3
        assert "\x1b[2J" not in watched.stdout  # not a terminal: no screen clearing
    finally:
        proxy.stop()
        for s in sims:
            s.stop()


def test_status_says_when_the_proxy_is_not_there() -> None:
    done = status("--proxy", f"http://127.0.0.1:{free_port()}", "--timeout", "2")
    assert done.returncode == 1 and "cannot read" in done.stdout
