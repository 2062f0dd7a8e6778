"""The dashboard at /status in a real browser (headless Chromium): every worker row with the numbers of
/admin/fleet, a killed worker shown out, the narrow layout, dark mode, and a screenshot in the test's tmp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dashboard_kit import browser, fleet, missing_browser, read_page, row_mismatches, shows, traffic, wait_page
from tests.procs_kit import http_json, wait_until


@pytest.fixture(autouse=True)
def _chromium() -> None:
    if (why := missing_browser()) is not None:
        pytest.fail(why)


@pytest.mark.slow
def test_dashboard_shows_the_fleet_and_a_killed_worker(tmp_path: Path) -> None:
    with fleet(tmp_path, workers=3) as (proxy, sims):
        assert traffic(proxy, 24) == 24
        with browser(tmp_path / "profile") as driver:
            driver.get(proxy.url + "/status")
            page = wait_page(driver, lambda p: len(p["rows"]) == 3 and all(
                w["prompt_tokens"] for w in p["doc"]["workers"]), what="3 worker rows with traffic")
            doc = page["doc"]
            # the page shows the document it fetched: every worker, every number
            assert set(page["rows"]) == {s.url for s in sims} == {w["url"] for w in doc["workers"]}
            for w in doc["workers"]:
                assert row_mismatches(page["rows"][w["url"]], w) == [], w["url"]
                assert w["state"] == "ready" and w["requests_per_s"] > 0 and w["hit_rate"] is not None
            f = doc["fleet"]
            assert shows(page["fleet"]["requests_per_s"], "rate", f["requests_per_s"]) and f["requests_per_s"] > 0
            assert shows(page["fleet"]["ttft_p99_s"], "ms", f["ttft_p99_s"]) and f["ttft_p99_s"] is not None
            assert shows(page["fleet"]["error_rate"], "pct", f["error_rate"]) and f["error_rate"] == 0
            assert page["fleet"]["ready"] == "3 / 3"
            assert shows(page["fleet"]["queue_depth"], "int", f["queue_depth"])
            # ... and that document is the endpoint's: the counts a later fetch gives (traffic has stopped)
            fresh = http_json("GET", proxy.url + "/admin/fleet")[1]
            for a, b in zip(sorted(doc["workers"], key=lambda w: w["url"]),
                            sorted(fresh["workers"], key=lambda w: w["url"]), strict=True):
                for key in ("models", "state", "in_flight", "prompt_tokens", "cached_tokens", "ejections"):
                    assert a[key] == b[key], key
            assert doc["routing"]["pinned_sessions"] == 6
            assert sum(doc["routing"]["decisions"].values()) == 24
            driver.save_screenshot(str(tmp_path / "dashboard.png"))

            victim = sims[1]
            victim.kill()
            page = wait_page(driver, lambda p: p["rows"][victim.url]["state"] != "ready", 30,
                             what="the killed worker shown out")
            cells = page["rows"][victim.url]
            assert cells["state"] == "ejected" and cells["reason"], cells
            assert driver.find_element("css selector", f'tr[data-worker="{victim.url}"]').get_attribute(
                "class") == "out"
            assert page["fleet"]["ready"] == "2 / 3"
            for w in page["doc"]["workers"]:
                assert row_mismatches(page["rows"][w["url"]], w) == []
            driver.save_screenshot(str(tmp_path / "dashboard-killed.png"))

            # a narrow window: rows become labelled cards; dark mode from prefers-color-scheme
            driver.set_window_size(420, 1000)
            assert driver.execute_script(
                "return getComputedStyle(document.querySelector('#workers thead')).display") == "none"
            assert driver.execute_script(
                "return getComputedStyle(document.querySelector('#workers td'), '::before').content") == '"worker"'
            driver.save_screenshot(str(tmp_path / "dashboard-narrow.png"))
            light = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
            driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                   {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
            dark = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
            assert light == "rgb(255, 255, 255)" and dark == "rgb(17, 20, 24)"
            driver.save_screenshot(str(tmp_path / "dashboard-dark.png"))
            assert read_page(driver)["rows"][victim.url]["state"] == "ejected"
    for name in ("dashboard.png", "dashboard-killed.png", "dashboard-narrow.png", "dashboard-dark.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_admin_token_guards_the_data_not_the_page(tmp_path: Path) -> None:
    with fleet(tmp_path, workers=1, proxy_flags=["--admin-token", "s3cret"]) as (proxy, _):
        assert http_json("GET", proxy.url + "/admin/fleet")[0] == 401
        assert http_json("GET", proxy.url + "/admin/fleet", headers={"Authorization": "Bearer nope"})[0] == 403
        status, doc = http_json("GET", proxy.url + "/admin/fleet", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and len(doc["workers"]) == 1
        with browser(tmp_path / "profile") as driver:
            driver.get(proxy.url + "/status")
            form = driver.find_element("id", "auth")
            # the page's first fetch answers 401: it asks for the token
            wait_until(lambda: form.get_attribute("hidden") is None, 30, what="the token form")
            driver.find_element("id", "token").send_keys("s3cret")
            form.submit()
            page = wait_page(driver, lambda p: len(p["rows"]) == 1, what="the row after the token")
            assert page["doc"]["workers"][0]["url"] in page["rows"]
