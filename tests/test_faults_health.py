"""Active health checks and passive ejection with real processes: out, back on its own, growing ejections,
never the last worker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults_kit import FAST_HEALTH, Fleet, chat, metric, node, post, start_fleet
from tests.procs_kit import wait_until

PROXY_FLAGS = [
    *FAST_HEALTH,
    "--eject-consecutive-failures",
    "3",
    "--eject-base-s",
    "1",
    "--eject-max-s",
    "2.5",
]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = start_fleet(tmp_path_factory.mktemp("health"), ["A", "B"], PROXY_FLAGS)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
def fl(fleet: Fleet) -> Iterator[Fleet]:
    yield fleet
    fleet.heal()


def out(fl: Fleet, name: str) -> bool:
    return bool(node(fl.proxy, fl[name].url)["health"]["out"])


def served_by(fl: Fleet, n: int) -> list[str]:
    workers = []
    for i in range(n):
        status, headers, _ = post(fl.proxy.url + "/v1/chat/completions", chat(i))
        assert status == 200
        workers.append(headers["X-Turbofleet-Worker"])
    return workers


def test_failing_health_takes_a_worker_out_and_passing_brings_it_back(fl: Fleet) -> None:
    a = fl["A"]
    a.fault("status", code=503, scope="all")  # /health answers 503 (and so does inference)
    wait_until(lambda: out(fl, "A"), 5, what="A out after failed checks")
    st = node(fl.proxy, a.url)
    assert st["state"] == "ejected" and st["health"]["down"] and st["reason"] == "status 503"
    retries = metric(fl.proxy, "turbofleet_retries_total")
    assert set(served_by(fl, 4)) == {fl["B"].url}  # routed around, without even a retry
    assert metric(fl.proxy, "turbofleet_retries_total") == retries
    a.clear()
    wait_until(lambda: not out(fl, "A"), 5, what="A back after passing checks")
    assert a.url in served_by(fl, 2)


def test_a_blip_heals_on_its_own(fl: Fleet) -> None:
    """Health fails for one second, then passes again: nobody intervenes, the worker is back."""
    fl["A"].fault("hang", scope="all", duration_s=1)  # /health times out meanwhile
    wait_until(lambda: out(fl, "A"), 5, what="A out")
    wait_until(lambda: not out(fl, "A"), 5, what="A back without help")


def test_dead_worker_returns_by_itself_after_restart(fl: Fleet) -> None:
    fl["A"].proc.kill()
    wait_until(lambda: out(fl, "A"), 5, what="A out after kill")
    assert set(served_by(fl, 3)) == {fl["B"].url}
    fl.restart("A")
    wait_until(lambda: not out(fl, "A"), 5, what="A back after restart")


def test_passive_ejections_grow_up_to_the_cap(fl: Fleet) -> None:
    """/health passes but inference answers 503: requests eject A, for 1 s, then 2 s, then 2.5 s (the cap).
    Clients see none of it: every request is retried on B."""
    a = fl["A"]
    a.fault("status", code=503)
    spans = []
    for _ in range(3):
        wait_until(lambda: not out(fl, "A"), 5, what="A back in")
        for i in range(20):  # round robin: A gets every other first try until it is out
            status, _, _ = post(fl.proxy.url + "/v1/chat/completions", chat(i))
            assert status == 200
            if out(fl, "A"):
                break
        h = node(fl.proxy, a.url)["health"]
        assert h["out"] and not h["down"]
        spans.append((h["times_ejected"], h["ejected_for_s"]))
    assert [t for t, _ in spans] == [1, 2, 3]
    for (_, left), cap in zip(spans, (1.0, 2.0, 2.5), strict=True):
        assert cap - 0.5 < left <= cap, spans


def test_never_the_last_healthy_worker(fl: Fleet) -> None:
    """Both workers fail their checks: one goes out, the last one stays in (requests still reach it)."""
    fl["A"].fault("status", code=503, scope="all")
    fl["B"].fault("status", code=503, scope="all")
    wait_until(lambda: out(fl, "A") or out(fl, "B"), 5, what="one worker out")
    # several more check rounds: still only one out
    rounds = metric(fl.proxy, "turbofleet_ejections_total")
    wait_until(
        lambda: max(fl[n].stats()["faults_fired"].get("status", 0) for n in "AB") >= 8, 5, what="more failed checks"
    )
    assert [out(fl, "A"), out(fl, "B")].count(True) == 1
    assert metric(fl.proxy, "turbofleet_ejections_total") == rounds
    status, _, _ = post(fl.proxy.url + "/v1/chat/completions", chat(9))
    assert status == 503  # the last worker was tried: its own 503 comes back, not "no worker"
