"""The dashboard in a real browser: a fleet with traffic, headless Chromium driven by Selenium, and the formats the
page uses. Shared by tests/test_dashboard_browser.py and the README screenshot (`python -m tests.dashboard_kit
OUT.png`, which scripts/dashboard-screenshot.sh runs).

Chromium and its driver are Debian's (`chromium`, `chromium-driver`, installed by scripts/install-chromium.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.procs_kit import Proc, http_json, openai_client, start_proxy, start_sim, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MODEL = "sim-model"
#: the flags the issue names, for a headless browser on a shared box
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage")
#: quick health checks, so a killed worker is out within a second or two
PROXY_FLAGS = ["--health-interval", "0.5", "--health-timeout", "0.5", "--unhealthy-threshold", "1"]
NONE = "—"


def missing_browser() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing: run `bash scripts/install-chromium.sh` (scripts/test.sh does)"
    return None


@contextlib.contextmanager
def browser(profile: Path, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """Headless Chromium with a fresh profile, driven through Debian's chromedriver (no driver download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def fleet(tmp: Path, workers: int = 3, proxy_flags: list[str] | None = None) -> Iterator[tuple[Proc, list[Proc]]]:
    """A proxy in front of `workers` simulated workers, every worker registered when this yields."""
    sims: list[Proc] = []
    proxy: Proc | None = None
    try:
        sims = [start_sim(tmp, MODEL, name=f"sim{i}") for i in range(workers)]
        args = [*PROXY_FLAGS, *(proxy_flags or [])]
        for s in sims:
            args += ["--worker", s.url]
        proxy = start_proxy(tmp, args, name="proxy")
        # /nodes/status needs the admin token when one is set
        token = args[args.index("--admin-token") + 1] if "--admin-token" in args else None
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        wait_until(lambda: len(http_json("GET", proxy.url + "/nodes/status", headers=auth)[1]) == workers, 30,
                   what=f"{workers} workers registered")
        yield proxy, sims
    finally:
        if proxy is not None:
            proxy.stop()
        for s in sims:
            s.stop()


def traffic(proxy: Proc, requests: int, sessions: int = 6, stream_every: int = 3) -> int:
    """`requests` chat completions over `sessions` conversations (a shared system prompt, so caches hit);
    returns how many answered."""
    c = openai_client(proxy.url + "/v1", timeout=60)
    system = "You are a careful assistant for the fleet operators. " * 30
    ok = 0
    for i in range(requests):
        session = f"conversation-{i % sessions}"
        messages: list[Any] = [{"role": "system", "content": system},
                    # conversations of different lengths: each worker's hit rate is its own
                    {"role": "user", "content": f"{session} question {i // sessions} " * (4 + 8 * (i % sessions))}]
        headers = {"X-Session-ID": session}
        if i % stream_every == 0:
            stream = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                               stream_options={"include_usage": True}, extra_headers=headers)
            for _ in stream:
                pass
        else:
            c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                      extra_headers=headers)
        ok += 1
    return ok


class Background:
    """Traffic in a thread until stopped (for charts that need minutes of history)."""

    def __init__(self, proxy: Proc, pause: float = 0.05) -> None:
        self.proxy, self.pause = proxy, pause
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.errors = 0

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                traffic(self.proxy, 6)
            except Exception:
                self.errors += 1
            self.stop_event.wait(self.pause)

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(60)


# ---- what the page shows, read in one script run (the page cannot refresh half-way through it)
READ_PAGE = """
const rows = {};
for (const tr of document.querySelectorAll('#workers tbody tr[data-worker]')) {
  const cells = {};
  for (const td of tr.querySelectorAll('td[data-field]')) cells[td.dataset.field] = td.textContent;
  const badge = tr.querySelector('.state');
  cells.state = badge ? badge.textContent : null;
  const why = tr.querySelector('[data-field=reason]');
  cells.reason = why ? why.textContent : '';
  rows[tr.dataset.worker] = cells;
}
const fleet = {};
for (const n of document.querySelectorAll('[data-fleet]')) fleet[n.dataset.fleet] = n.textContent;
return {doc: window.turbofleetFleet || null, rows: rows, fleet: fleet};
"""


def read_page(driver: Any) -> dict[str, Any]:
    return dict(driver.execute_script(READ_PAGE))


def wait_page(driver: Any, predicate: Any, timeout: float = 30.0, what: str = "the page") -> dict[str, Any]:
    """Poll the page until predicate(page) holds; returns that page."""
    found: dict[str, Any] = {}

    def check() -> bool:
        page = read_page(driver)
        if page["doc"] is not None and predicate(page):
            found.update(page)
            return True
        return False

    wait_until(check, timeout, interval=0.2, what=what)
    return found


# ---- the page's formats (status.js `fmt`), for comparing cells with the JSON's numbers
def expected(kind: str, v: Any) -> tuple[float | None, str]:
    """(number, unit suffix) the page shows for a value of this kind; number None means "—"."""
    if v is None:
        return None, ""
    if kind == "int":
        return float(round(v)), ""
    if kind == "rate":
        return float(v), ""
    if kind == "pct":
        return float(v) * 100, "%"
    if kind == "ms":
        return float(v) * 1000, " ms"
    raise ValueError(kind)


DECIMALS = {"int": 0, "rate": 2, "pct": 1, "ms": 1}


def shows(text: str, kind: str, v: Any) -> bool:
    """The cell's text is the value in the page's format (within the last digit's rounding)."""
    want, unit = expected(kind, v)
    if want is None:
        return text == NONE
    if not text.endswith(unit):
        return False
    try:
        got = float(text[: len(text) - len(unit)] if unit else text)
    except ValueError:
        return False
    return math.isclose(got, want, abs_tol=0.5 * 10 ** -DECIMALS[kind] + 1e-9)


#: worker row cells: field -> (kind, JSON key)
WORKER_NUMBERS = {
    "in_flight": ("int", "in_flight"),
    "waiting": ("int", "waiting"),
    "kv_usage": ("pct", "kv_usage"),
    "hit_rate": ("pct", "hit_rate"),
    "ttft_p50_s": ("ms", "ttft_p50_s"),
    "ttft_p99_s": ("ms", "ttft_p99_s"),
    "requests_per_s": ("rate", "requests_per_s"),
    "ejections": ("int", "ejections"),
}


def row_mismatches(cells: dict[str, str], w: dict[str, Any]) -> list[str]:
    """What in one worker row differs from its JSON object."""
    bad = []
    if cells.get("worker") != w["url"]:
        bad.append(f"worker {cells.get('worker')!r} != {w['url']!r}")
    if cells.get("models") != ", ".join(w["models"]):
        bad.append(f"models {cells.get('models')!r}")
    if cells.get("state") != w["state"]:
        bad.append(f"state {cells.get('state')!r} != {w['state']!r}")
    if cells.get("reason", "") != (w["reason"] or ""):
        bad.append(f"reason {cells.get('reason')!r} != {w['reason']!r}")
    for field, (kind, key) in WORKER_NUMBERS.items():
        if not shows(cells.get(field, ""), kind, w[key]):
            bad.append(f"{field} shows {cells.get(field)!r} for {w[key]!r}")
    return bad


# ---- the README picture
def screenshot(out: Path, seconds: float = 75.0) -> None:
    """A fleet of 4 with a few minutes' worth of charts, one worker killed near the end, and the page's picture."""
    import tempfile

    if (why := missing_browser()) is not None:
        sys.exit(why)
    with tempfile.TemporaryDirectory(prefix="tf-shot-") as d:
        tmp = Path(d)
        with fleet(tmp, workers=4) as (proxy, sims), Background(proxy):
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(1)
            sims[3].kill()
            wait_until(lambda: any(w["state"] != "ready" for w in http_json("GET", proxy.url + "/admin/fleet")[1]
                                   ["workers"]), 30, what="the killed worker out")
            time.sleep(6)  # one more sample, so the charts show the killed worker's line end
            with browser(tmp / "profile", 1400, 1250) as driver:
                driver.get(proxy.url + "/status")
                wait_page(driver, lambda p: len(p["rows"]) == 4, what="4 worker rows")
                out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(out))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description="Make the README's dashboard screenshot over a running fleet.")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float, default=75.0, help="traffic before the picture (default 75)")
    args = ap.parse_args()
    screenshot(args.out, args.seconds)


if __name__ == "__main__":
    main()
