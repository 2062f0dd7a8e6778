"""Metrics series keys (issue 16 made the one-label key skip the sort): same labels, same series."""

from __future__ import annotations

from turbofleet.proxy.metrics import Metrics


def test_series_keys_do_not_depend_on_label_order() -> None:
    m = Metrics()
    m.inc("turbofleet_requests_total", route="/v1/chat/completions", status="200")
    m.inc("turbofleet_requests_total", status="200", route="/v1/chat/completions")
    m.inc("turbofleet_route_decisions_total", reason="prefix")
    m.inc("turbofleet_route_decisions_total", reason="prefix")
    m.inc("turbofleet_client_disconnects_total")
    m.observe("turbofleet_request_seconds", 0.01)
    m.observe("turbofleet_request_seconds", 0.02)
    assert m.counter_value("turbofleet_requests_total", route="/v1/chat/completions", status="200") == 2
    assert m.counter_value("turbofleet_route_decisions_total", reason="prefix") == 2
    assert m.counter_value("turbofleet_client_disconnects_total") == 1
    text = m.render()
    assert 'turbofleet_requests_total{route="/v1/chat/completions",status="200"} 2' in text
    assert "turbofleet_request_seconds_count 2" in text
