"""End to end: a real proxy and real simulated workers on 127.0.0.1, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.procs_kit import Proc, free_port, http_json, openai_client, start_proxy, start_sim, wait_until

MODEL = "sim-model"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, list[Proc]]]:
    logs = tmp_path_factory.mktemp("fleet")
    sims = [start_sim(logs, MODEL, extra=["--default-max-tokens", "16"]) for _ in range(2)]
    proxy = start_proxy(logs, ["--policy", "round_robin", *[a for s in sims for a in ("--worker", s.url)]])
    try:
        wait_until(lambda: len(http_json("GET", proxy.url + "/nodes/status")[1]) == 2, what="2 workers")
        yield proxy, sims
    finally:
        for p in [proxy, *sims]:
            p.stop()


def client(proxy: Proc) -> openai.OpenAI:
    return openai_client(proxy.url + "/v1")


def no_leaks(proxy: Proc) -> None:
    """Every in-flight count the proxy took was given back."""
    def settled() -> bool:
        status = http_json("GET", proxy.url + "/nodes/status")[1]
        return all(w["unfinished"] == 0 for w in status.values())
    wait_until(settled, 5, what="in-flight counts back to zero")


def test_sync_chat_and_spread(fleet: tuple[Proc, list[Proc]]) -> None:
    proxy, sims = fleet
    c = client(proxy)
    workers: Counter[str] = Counter()
    for i in range(4):
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"hello number {i}"}], max_tokens=5)
        resp = raw.parse()
        workers[raw.headers["X-Turbofleet-Worker"]] += 1
        assert resp.choices[0].message.content
        assert resp.usage is not None and resp.usage.completion_tokens == 5
        assert resp.usage.prompt_tokens_details is not None
    assert set(workers) == {s.url for s in sims}, "round_robin must use both workers"
    assert workers[sims[0].url] == workers[sims[1].url] == 2
    no_leaks(proxy)


def test_async_chat_concurrent(fleet: tuple[Proc, list[Proc]]) -> None:
    proxy, _ = fleet

    async def go() -> list[str]:
        c = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="none", max_retries=0, timeout=30)
        try:
            rs = await asyncio.gather(*(c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=3) for i in range(8)))
            return [r.choices[0].message.content or "" for r in rs]
        finally:
            await c.close()

    texts = asyncio.run(go())
    assert len(texts) == 8 and all(len(t.split()) == 3 for t in texts)
    no_leaks(proxy)


def test_streaming_chat_with_usage(fleet: tuple[Proc, list[Proc]]) -> None:
    proxy, _ = fleet
    stream = client(proxy).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream please"}], max_tokens=7, stream=True,
        stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert len("".join(pieces).split()) == 7
    assert usage is not None and usage.completion_tokens == 7
    no_leaks(proxy)


def test_completions_stream_and_not(fleet: tuple[Proc, list[Proc]]) -> None:
    proxy, _ = fleet
    c = client(proxy)
    r = c.completions.create(model=MODEL, prompt="once upon a time", max_tokens=4)
    assert len(r.choices[0].text.split()) == 4
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="once upon a time", max_tokens=4, stream=True) if ch.choices)
    assert len(text.split()) == 4


def test_sse_bytes_pass_through_unchanged(fleet: tuple[Proc, list[Proc]]) -> None:
    """The proxy relays the worker's SSE bytes as they are."""
    proxy, sims = fleet
    import urllib.request

    body = (b'{"model": "sim-model", "messages": [{"role": "user", "content": "same bytes"}], '
            b'"max_tokens": 6, "stream": true}')

    def fetch(url: str) -> bytes:
        req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            answer: bytes = r.read()
            return answer

    via_proxy = fetch(proxy.url)
    direct = fetch(sims[0].url)

    def shape(raw: bytes) -> list[bytes]:  # ids and timestamps differ per request; the framing must not
        return [line.split(b'"id"')[0] for line in raw.split(b"\n\n")]

    assert via_proxy.endswith(b"data: [DONE]\n\n")
    assert shape(via_proxy) == shape(direct)


def test_models_union(fleet: tuple[Proc, list[Proc]]) -> None:
    proxy, _ = fleet
    ids = [m.id for m in client(proxy).models.list()]
    assert ids == [MODEL]


def test_unknown_model_404(fleet: tuple[Proc, list[Proc]]) -> None:
    proxy, _ = fleet
    with pytest.raises(openai.NotFoundError) as exc:
        client(proxy).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert exc.value.status_code == 404
    status, body = http_json("POST", proxy.url + "/v1/chat/completions",
                             {"model": "no-such-model", "messages": []})
    assert status == 404 and body["error"]["code"] == "model_not_found" and "no-such-model" in body["error"]["message"]


def test_malformed_json_400(fleet: tuple[Proc, list[Proc]]) -> None:
    proxy, _ = fleet
    status, body = http_json("POST", proxy.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = http_json("POST", proxy.url + "/v1/chat/completions", [1, 2])
    assert status == 400
    status, body = http_json("POST", proxy.url + "/v1/chat/completions", {"model": MODEL})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = http_json("POST", proxy.url + "/v1/completions", {"prompt": "x"})
    assert status == 400 and body["error"]["param"] == "model"


def test_pass_through_routes(fleet: tuple[Proc, list[Proc]]) -> None:
    proxy, _ = fleet
    emb = client(proxy).embeddings.create(model=MODEL, input="hello")
    assert emb.data and len(emb.data[0].embedding) > 0
    status, body = http_json("POST", proxy.url + "/generate", {"prompt": "hello there", "max_tokens": 3})
    assert status == 200, body


def test_lmdeploy_style_registration(tmp_path: Path) -> None:
    """An api_server started with --proxy-url registers itself with LMDeploy's exact call."""
    proxy = start_proxy(tmp_path)
    sim = None
    try:
        sim = start_sim(tmp_path, "reg-model", extra=["--proxy", proxy.url])
        wait_until(lambda: sim.url in http_json("GET", proxy.url + "/nodes/status")[1], what="registration")
        st = http_json("GET", proxy.url + "/nodes/status")[1][sim.url]
        assert st["models"] == ["reg-model"] and st["role"] == 1 and st["source"] == "lmdeploy"
        r = client(proxy).chat.completions.create(model="reg-model", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=2)
        assert r.choices[0].message.content
        # the 0.0.0.0 LMDeploy often registers becomes the address the call came from
        port = free_port()
        status, _ = http_json("POST", proxy.url + "/nodes/add",
                              {"url": f"http://0.0.0.0:{port}", "status": {"models": ["ghost"], "role": 1}})
        assert status == 200
        assert f"http://127.0.0.1:{port}" in http_json("GET", proxy.url + "/nodes/status")[1]
        # removal, LMDeploy's body
        status, _ = http_json("POST", proxy.url + "/nodes/remove", {"url": f"http://127.0.0.1:{port}"})
        assert status == 200
        assert f"http://127.0.0.1:{port}" not in http_json("GET", proxy.url + "/nodes/status")[1]
        status, _ = http_json("POST", proxy.url + "/nodes/remove", {"url": f"http://127.0.0.1:{port}"})
        assert status == 404
        # a node added without status: its models are read from its /v1/models
        sim2 = start_sim(tmp_path, "disc-model")
        try:
            assert http_json("POST", proxy.url + "/nodes/add", {"url": sim2.url})[0] == 200
            assert http_json("GET", proxy.url + "/nodes/status")[1][sim2.url]["models"] == ["disc-model"]
        finally:
            sim2.stop()
    finally:
        if sim:
            sim.stop()
        proxy.stop()


def test_known_model_without_ready_worker_503(tmp_path: Path) -> None:
    sim = start_sim(tmp_path, "drain-model")
    proxy = start_proxy(tmp_path, ["--worker", sim.url])
    try:
        wait_until(lambda: sim.url in http_json("GET", proxy.url + "/nodes/status")[1], what="worker")
        assert http_json("POST", proxy.url + "/nodes/drain", {"url": sim.url})[0] == 200
        status, body = http_json("POST", proxy.url + "/v1/chat/completions",
                                 {"model": "drain-model", "messages": [{"role": "user", "content": "x"}]})
        assert status == 503 and body["error"]["type"] == "service_unavailable"
        assert "drain-model" not in [m["id"] for m in http_json("GET", proxy.url + "/v1/models")[1]["data"]]
    finally:
        proxy.stop()
        sim.stop()


def test_health_and_metrics(fleet: tuple[Proc, list[Proc]]) -> None:
    proxy, _ = fleet
    status, body = http_json("GET", proxy.url + "/health")
    assert status == 200 and body["ready_workers"] == 2 and body["registry"]["backend"] == "memory"
    status, text = http_json("GET", proxy.url + "/metrics")
    assert status == 200 and "turbofleet_requests_total" in text and "turbofleet_worker_in_flight" in text


def test_nodes_terminate(tmp_path: Path) -> None:
    """LMDeploy's /nodes/terminate asks the api_server to exit (GET /terminate) and forgets it."""
    sim = start_sim(tmp_path, "term-model")
    # terminate is admin-only (issue 11): refused without an admin token, allowed with it
    proxy = start_proxy(tmp_path, ["--worker", sim.url, "--admin-token", "adm"])
    adm = {"Authorization": "Bearer adm"}
    try:
        wait_until(lambda: sim.url in http_json("GET", proxy.url + "/nodes/status", headers=adm)[1], what="worker")
        assert http_json("POST", proxy.url + "/nodes/terminate", {"url": sim.url})[0] == 401
        assert http_json("POST", proxy.url + "/nodes/terminate", {"url": sim.url}, headers=adm)[0] == 200
        assert sim.url not in http_json("GET", proxy.url + "/nodes/status", headers=adm)[1]
        wait_until(lambda: not sim.alive(), 10, what="the sim to exit")
        assert http_json("POST", proxy.url + "/nodes/terminate", {"url": sim.url}, headers=adm)[0] == 404
    finally:
        proxy.stop()
        sim.stop()


def test_route_reason_header_metric_and_log(tmp_path: Path) -> None:
    """kv_aware explains every decision: in X-Turbofleet-Route, in the decision metric, and in the log."""
    sims = [start_sim(tmp_path, MODEL) for _ in range(2)]
    proxy = start_proxy(tmp_path, ["--policy", "kv_aware", "--log-level", "debug",
                                   *[a for s in sims for a in ("--worker", s.url)]])
    try:
        wait_until(lambda: len(http_json("GET", proxy.url + "/nodes/status")[1]) == 2, what="2 workers")
        c = client(proxy)
        reasons = []
        for i in range(3):
            raw = c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": f"turn {i} " * 50}], max_tokens=2,
                extra_headers={"X-Session-ID": "conv-1"})
            reasons.append(raw.headers["X-Turbofleet-Route"])
        assert reasons[0].startswith("new session") and reasons[1:] == ["pin", "pin"]
        metrics = http_json("GET", proxy.url + "/metrics")[1]
        assert re.search(r'^turbofleet_route_decisions_total\{reason="pin"\} 2(\.0)?$', str(metrics), re.M)
        wait_until(lambda: "conv-1" in proxy.output() and "(pin)" in proxy.output(), 5, what="decisions logged")
    finally:
        proxy.stop()
        for s in sims:
            s.stop()
