"""The metrics facade over prometheus-client, the dashboard's ring of samples, and what a live proxy exports."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs_kit import http_json, openai_client, start_proxy, start_sim, wait_until
from turbofleet.proxy.history import History, Snap, quantile, read, window
from turbofleet.proxy.metrics import BUCKETS, SPECS, Metrics

MODEL = "sim-model"


def families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(s.name, dict(s.labels), s.value) for s in fam.samples]
    return out


def test_facade_counts_and_renders_standard_exposition() -> None:
    m = Metrics()
    m.inc("turbofleet_requests_total", route="/v1/chat/completions", model="a", status="200")
    m.inc("turbofleet_requests_total", 2, route="/v1/chat/completions", model="a", status="200")
    # a call site that predates a label still counts, under "" for the label it leaves out
    m.inc("turbofleet_requests_total", route="/v1/completions", status="502")
    m.observe("turbofleet_ttft_seconds", 0.003, worker="http://w1")
    m.observe("turbofleet_ttft_seconds", 0.2, worker="http://w1")
    assert m.counter_value("turbofleet_requests_total", route="/v1/chat/completions", model="a", status="200") == 3
    assert m.counter_value("turbofleet_requests_total", route="/v1/completions", status="502") == 1
    assert m.counter_value("turbofleet_requests_total", route="/nowhere", status="200") == 0
    fams = families(m.render([("turbofleet_worker_ready", "1 when ready.", {"worker": "http://w1"}, 1.0)]))
    reqs = {(lb["route"], lb["model"], lb["status"]): v for n, lb, v in fams["turbofleet_requests"]
            if n == "turbofleet_requests_total"}
    assert reqs == {("/v1/chat/completions", "a", "200"): 3.0, ("/v1/completions", "", "502"): 1.0}
    ttft = {lb.get("le"): v for n, lb, v in fams["turbofleet_ttft_seconds"] if n.endswith("_bucket")}
    assert ttft["0.0025"] == 0 and ttft["0.005"] == 1 and ttft["0.25"] == 2 and ttft["+Inf"] == 2
    assert fams["turbofleet_worker_ready"] == [("turbofleet_worker_ready", {"worker": "http://w1"}, 1.0)]
    # every declared family is exported from the start, samples or not; no *_created noise
    assert {n.removesuffix("_total") for n in SPECS} <= set(fams)
    assert not [n for f in fams.values() for n, _, _ in f if n.endswith("_created")]


def test_facade_refuses_labels_a_metric_does_not_have() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="no label tenant"):
        m.inc("turbofleet_retries_total", reason="connect", tenant="x")
    with pytest.raises(ValueError, match="is a counter"):
        m.observe("turbofleet_retries_total", 1.0, reason="connect")


def test_undeclared_metrics_are_created_on_first_use() -> None:
    m = Metrics()
    m.inc("turbofleet_custom_total", kind="a")
    m.set("turbofleet_queue_depth", 4, model="m", priority="batch")
    fams = families(m.render())
    assert fams["turbofleet_custom"] == [("turbofleet_custom_total", {"kind": "a"}, 1.0)]
    assert fams["turbofleet_queue_depth"] == [("turbofleet_queue_depth", {"model": "m", "priority": "batch"}, 4.0)]


def test_quantile_interpolates_within_buckets_like_prometheus() -> None:
    bounds = (0.1, 0.2, 0.4)
    # 10 observations in (0.1, 0.2], 10 in (0.2, 0.4]
    cumulative = [0.0, 10.0, 20.0, 20.0]
    assert quantile(0.5, cumulative, bounds) == pytest.approx(0.2)
    assert quantile(0.25, cumulative, bounds) == pytest.approx(0.15)
    assert quantile(0.99, cumulative, bounds) == pytest.approx(0.2 + 0.2 * 9.8 / 10)
    assert quantile(0.5, [0.0, 0.0, 0.0, 0.0], bounds) is None
    assert quantile(0.99, [0.0, 0.0, 0.0, 5.0], bounds) == 0.4  # all above the last bound


def test_window_and_ring_turn_counters_into_rates() -> None:
    m = Metrics()
    h = History(m, interval=5.0, span=15.0)
    h.sample(100.0)
    for _ in range(10):
        m.inc("turbofleet_upstream_tries_total", worker="w1", outcome="ok")
        m.inc("turbofleet_requests_total", route="/v1/completions", model="a", status="200")
        m.observe("turbofleet_ttft_seconds", 0.04, worker="w1")
    m.inc("turbofleet_requests_total", 10, route="/v1/completions", model="a", status="503")
    m.inc("turbofleet_prompt_tokens_total", 400, worker="w1", model="a")
    m.inc("turbofleet_cached_tokens_total", 100, worker="w1", model="a")
    m.inc("turbofleet_route_decisions_total", 7, reason="pin")
    h.sample(105.0)
    w = window(read(m), h.since(105.0, 60.0)[1], 5.0)
    assert w["requests_per_s"] == pytest.approx(4.0) and w["error_rate"] == pytest.approx(0.5)
    assert w["decisions"] == {"pin": 7.0} and w["hit_rate"] == pytest.approx(0.25)
    w1 = w["workers"]["w1"]
    assert w1["requests_per_s"] == pytest.approx(2.0) and w1["hit_rate"] == pytest.approx(0.25)
    assert 0.025 < w1["ttft_p50_s"] <= 0.05 and 0.025 < w1["ttft_p99_s"] <= 0.05
    charts = h.charts(105.0)
    assert charts["t"] == [0.0] and charts["workers"]["w1"]["requests_per_s"] == [2.0]
    # bounded: a 15 s span at 5 s keeps 4 snaps and 3 points, however long it runs
    for i in range(2, 50):
        h.sample(100.0 + 5 * i)
    assert len(h.snaps) == 4 and len(h.points) == 3
    assert h.charts(345.0)["workers"]["w1"]["requests_per_s"] == [0.0, 0.0, 0.0]


def test_empty_snap_window_has_no_rates() -> None:
    w = window(Snap(), Snap(), 0.0)
    assert w["requests_per_s"] == 0.0 and w["error_rate"] is None and w["ttft_p99_s"] is None
    assert len(BUCKETS) == len(sorted(set(BUCKETS)))


def test_live_proxy_exports_per_worker_and_per_model_series(tmp_path: Path) -> None:
    """Traffic through a real proxy and sim: requests by model, tokens and TTFT by worker, tries by worker."""
    sim = start_sim(tmp_path, MODEL)
    proxy = start_proxy(tmp_path, ["--worker", sim.url])
    try:
        wait_until(lambda: len(http_json("GET", proxy.url + "/nodes/status")[1]) == 1, what="1 worker")
        c = openai_client(proxy.url + "/v1")
        for _ in range(3):
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "same prefix " * 40}],
                                      max_tokens=2)
        fams = families(str(http_json("GET", proxy.url + "/metrics")[1]))
        by_model = {lb["model"]: v for n, lb, v in fams["turbofleet_requests"] if n.endswith("_total")}
        assert by_model == {MODEL: 3.0}
        prompt = {lb["worker"]: v for _, lb, v in fams["turbofleet_prompt_tokens"]}
        cached = {lb["worker"]: v for _, lb, v in fams["turbofleet_cached_tokens"]}
        assert prompt[sim.url] > 0 and 0 < cached[sim.url] < prompt[sim.url]  # the 2nd and 3rd hit the cache
        tries = {(lb["worker"], lb["outcome"]): v for _, lb, v in fams["turbofleet_upstream_tries"]}
        assert tries == {(sim.url, "ok"): 3.0}
        ttft = [v for n, lb, v in fams["turbofleet_ttft_seconds"] if n.endswith("_count")]
        assert ttft == [3.0]
    finally:
        proxy.stop()
        sim.stop()


def test_routing_view_names_repin_causes_and_the_queues_decisions() -> None:
    from turbofleet.proxy.observe import repin_cause

    assert repin_cause("re-pin: pinned worker overloaded load=9 mean=3.0") == "overloaded"
    assert repin_cause("re-pin: pinned worker ejected (status 502); prefix 3/4") == "ejected"
    assert repin_cause("re-pin") == "other"
    m = Metrics()
    h = History(m)
    h.sample(0.0)
    m.inc("turbofleet_route_decisions_total", 5, reason="pin")
    m.inc("turbofleet_route_decisions_total", 3, reason="re-pin")
    m.inc("turbofleet_repins_total", 2, cause="overloaded")
    m.inc("turbofleet_repins_total", 1, cause="ejected")
    m.inc("turbofleet_queue_admitted_total", 4, queued="yes", priority="default")
    m.inc("turbofleet_queue_admitted_total", 9, queued="no", priority="default")
    m.inc("turbofleet_queue_shed_total", 2, reason="queue_full", priority="batch")
    w = window(read(m), h.since(10.0, 300.0)[1], 10.0)
    assert w["decisions"] == {"pin": 5.0, "re-pin: overloaded": 2.0, "re-pin: ejected": 1.0, "queued": 4.0,
                              "shed: queue_full": 2.0}


def test_exposition_is_prometheus_clients_own() -> None:
    """The lock-free series render exactly what prometheus-client's own Counter/Histogram/Gauge render for the
    same updates: declared and undeclared metrics, a label left out, values that hit bucket bounds."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    m = Metrics()
    ref = CollectorRegistry(auto_describe=False)
    own: dict[str, object] = {}
    for name, spec in SPECS.items():
        make = {"counter": Counter, "histogram": Histogram, "gauge": Gauge}[spec.kind]
        kw = {"buckets": spec.buckets} if spec.kind == "histogram" else {}
        own[name] = make(name, spec.help, spec.labels, registry=ref, **kw)

    def both(kind: str, name: str, value: float, **labels: str) -> None:
        if name not in own:
            make = {"inc": Counter, "observe": Histogram, "set": Gauge}[kind]
            kw = {"buckets": BUCKETS} if kind == "observe" else {}
            own[name] = make(name, name.replace("_", " "), tuple(sorted(labels)), registry=ref, **kw)
        getattr(m, kind)(name, value, **labels)
        metric: object = own[name]
        names = SPECS[name].labels if name in SPECS else tuple(sorted(labels))
        child = metric.labels(*(labels.get(n, "") for n in names)) if names else metric  # type: ignore[attr-defined]
        getattr(child, kind)(value)

    both("inc", "turbofleet_requests_total", 1, route="/v1/chat/completions", model="m", status="200")
    both("inc", "turbofleet_requests_total", 2.5, route="/v1/chat/completions", model="m", status="429")
    both("inc", "turbofleet_retry_budget_exhausted_total", 1)
    both("inc", "turbofleet_ejections_total", 1, cause="passive", worker="http://a")  # `reason` left out
    both("inc", "turbofleet_extra_total", 3, flavour="x")  # undeclared
    for v in (0.0, 0.0005, 0.001, 0.0025, 0.003, 0.2, 1.0, 7.0, 60.0, 500.0):
        both("observe", "turbofleet_ttft_seconds", v, worker="http://a")
    both("observe", "turbofleet_request_seconds", 0.01, model="m")
    both("observe", "turbofleet_extra_seconds", 0.3)
    both("set", "turbofleet_extra_gauge", 4, pool="p")
    assert m.render() == generate_latest(ref).decode()
    assert m.counter_value("turbofleet_requests_total", route="/v1/chat/completions", model="m", status="429") == 2.5
    assert m.counter_value("turbofleet_ttft_seconds", worker="http://a") == 0.0  # not a counter


def test_usage_tokens_are_read_once_with_json_number_rules() -> None:
    """observe.tokens: what every consumer of a worker's usage (counters, the request log, the policy, the
    backlog) gets. A count that is not a JSON number (bool, string, null) is None; cached is 0 when a prompt
    count came without one; no usage at all is None."""
    from turbofleet.proxy.observe import tokens

    assert tokens(None) is None and tokens({}) is None
    assert tokens({"prompt_tokens": 12, "completion_tokens": 3}) == (12, 0, 3)
    assert tokens({"prompt_tokens": 12.0, "prompt_tokens_details": {"cached_tokens": 8},
                   "completion_tokens": 3}) == (12, 8, 3)
    assert tokens({"prompt_tokens": True, "completion_tokens": "3"}) == (None, None, None)
    assert tokens({"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": False}}) == (5, 0, None)
    assert tokens({"prompt_tokens": 5, "prompt_tokens_details": [4]}) == (5, 0, None)
    assert tokens({"completion_tokens": 9, "prompt_tokens_details": {"cached_tokens": 2}}) == (None, 2, 9)
