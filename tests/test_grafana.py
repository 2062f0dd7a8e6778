"""The Grafana dashboard (deploy/grafana/turbofleet.json): every PromQL expression parses, and every metric it
names is one a running proxy really exports (scraped from a proxy in front of a simulated worker). The Helm
chart ships it as a ConfigMap for the Grafana sidecar, the same JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy_kit import render
from tests.procs_kit import ROOT, http_json, openai_client, start_proxy, start_sim, wait_until

DASHBOARD = ROOT / "deploy" / "grafana" / "turbofleet.json"
CHART = ROOT / "deploy" / "helm" / "turbofleet"
MODEL = "sim-model"
#: names another part of the proxy exports when it is there: the overload queue (issue 10)
WITH_QUEUE = {"turbofleet_queue_depth"}


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def expressions(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict) and q.get("query", "").startswith("label_values("):
            inner = q["query"].removeprefix("label_values(").rsplit(",", 1)[0]
            exprs.append(inner)
    return exprs


def metric_names(node: Any) -> set[str]:
    """Every metric name a parsed PromQL expression selects."""
    if type(node).__name__ == "VectorSelector":
        return {node.name} if node.name else set()
    names: set[str] = set()
    for attr in ("lhs", "rhs", "expr", "param", "vector_selector", "args"):
        child = getattr(node, attr, None)
        if child is None:
            continue
        for c in child if isinstance(child, list) else [child]:
            names |= metric_names(c)
    return names


def _dashboard_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    names: set[str] = set()
    for expr in expressions(dash):
        names |= metric_names(promql_parser.parse(expr.replace("$worker", ".*")))
    return names


def test_every_expression_parses_and_names_turbofleet_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = expressions(dash)
    assert len(exprs) >= 25
    for expr in exprs:
        assert metric_names(promql_parser.parse(expr.replace("$worker", ".*"))), expr
    assert all(n.startswith("turbofleet_") for n in _dashboard_names())
    ids = [p["id"] for p in _panels(dash)]
    assert len(ids) == len(set(ids)) and dash["uid"] == "turbofleet"


def exported(text: str) -> set[str]:
    """Every sample name a scrape can hold, counting declared families that have no series yet."""
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names |= {s.name for s in fam.samples}
        if fam.type == "counter":
            names.add(fam.name + "_total")
        elif fam.type == "histogram":
            names |= {fam.name + "_bucket", fam.name + "_sum", fam.name + "_count"}
        else:
            names.add(fam.name)
    return names


def test_every_metric_the_dashboard_names_is_exported_by_a_running_proxy(tmp_path: Path) -> None:
    sim = start_sim(tmp_path, MODEL)
    proxy = start_proxy(tmp_path, ["--worker", sim.url])
    try:
        wait_until(lambda: len(http_json("GET", proxy.url + "/nodes/status")[1]) == 1, what="1 worker")
        openai_client(proxy.url + "/v1").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=2)
        have = exported(str(http_json("GET", proxy.url + "/metrics")[1]))
        queue = http_json("GET", proxy.url + "/admin/fleet")[1]["fleet"]["queue"]
    finally:
        proxy.stop()
        sim.stop()
    missing = _dashboard_names() - have
    if queue is None:  # this proxy has no overload queue: its one metric may be absent, nothing else
        missing -= WITH_QUEUE
    assert missing == set()


def test_the_helm_chart_ships_the_same_dashboard_for_the_sidecar() -> None:
    spec = importlib.util.spec_from_file_location("helm_template", ROOT / "deploy" / "grafana" / "helm_template.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    on_disk = (CHART / "templates" / "grafana-dashboard.yaml").read_text()
    assert on_disk == mod.template_text(), "run `python deploy/grafana/helm_template.py`"
    docs, _ = render({"grafanaDashboard": {"enabled": True}})  # the real `helm template`
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-grafana-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["turbofleet.json"]) == json.loads(DASHBOARD.read_text())
    off, _ = render()
    assert not [d for d in off if d["metadata"]["name"].endswith("-grafana-dashboard")]
