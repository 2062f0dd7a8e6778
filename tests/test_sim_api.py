"""The simulated api_server over HTTP, as a real process, spoken to with the official openai SDK."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.procs_kit import Proc, http_json, start_sim, wait_until
from turbofleet.worker.sim.tokens import output_text, output_words, render_chat, tokenize

MODEL = "sim-api-model"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    logs: Path = tmp_path_factory.mktemp("sim-api")
    proc = start_sim(logs, model=MODEL, extra=["--speed", "0.1", "--default-max-tokens", "12", "--block-size", "4"])
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture
def client(sim: Proc) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{sim.url}/v1", api_key="none", max_retries=0) as c:
        yield c


def raw_post(url: str, body: dict[str, object]) -> tuple[int, str, bytes]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


MSGS: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "you are a simulator"},
    {"role": "user", "content": "say something"},
]


def test_models_and_health(sim: Proc, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    status, body = http_json("GET", f"{sim.url}/v1/models")
    card = body["data"][0]
    assert (card["object"], card["owned_by"], card["root"], card["parent"]) == ("model", "lmdeploy", MODEL, None)
    assert isinstance(card["created"], int) and card["permission"][0]["object"] == "model_permission"
    status, body = http_json("GET", f"{sim.url}/health")
    assert status == 200 and body["status"] == "healthy"


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=7)
    prompt = render_chat(MSGS)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == output_text(output_words(prompt, 7))
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(tokenize(prompt)),
        7,
        len(tokenize(prompt)) + 7,
    )
    assert r.usage.prompt_tokens_details is not None and r.usage.prompt_tokens_details.cached_tokens is not None


def test_default_max_tokens_and_lmdeploy_extras(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        extra_body={"session_id": 42, "ignore_eos": True, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1},
    )
    assert r.usage is not None and r.usage.completion_tokens == 12  # --default-max-tokens


def test_chat_streaming_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == output_text(output_words(render_chat(MSGS), 5))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 5  # one chunk per token


def test_chat_stream_exact_bytes(sim: Proc) -> None:
    status, ctype, raw = raw_post(
        f"{sim.url}/v1/chat/completions", {"model": MODEL, "messages": MSGS, "max_tokens": 3, "stream": True}
    )
    assert status == 200 and ctype.startswith("text/event-stream")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]" and len(events) == 3 + 1 + 1 + 1
    pat = re.compile(
        rb'^data: \{"id":"chatcmpl-[0-9a-f]+","object":"chat\.completion\.chunk","created":\d+,'
        rb'"model":"sim-api-model","choices":\[\{"index":0,"delta":\{(.*)\},"logprobs":null,'
        rb'"finish_reason":(null|"length")\}\]\}$'
    )
    deltas = [pat.match(e) for e in events[:4]]
    assert all(deltas), events
    assert deltas[0] is not None and deltas[0].group(1).startswith(b'"role":"assistant","content":"')
    assert deltas[3] is not None and deltas[3].group(1) == b"" and deltas[3].group(2) == b'"length"'
    assert "usage" not in json.loads(events[0][6:])


def test_completions_both_ways(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=4)
    assert r.object == "text_completion" and r.choices[0].text == output_text(output_words("once upon a time", 4))
    assert r.usage is not None and r.usage.prompt_tokens == 4
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="once upon a time", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8


async def test_async_client(sim: Proc) -> None:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="none", max_retries=0) as c:
        r = await c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3)
        assert r.usage is not None and r.usage.completion_tokens == 3
        stream = await c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        assert text == r.choices[0].message.content


def test_repeated_prompt_is_cached(client: openai.OpenAI, sim: Proc) -> None:
    msgs = [{"role": "user", "content": " ".join(f"w{i}" for i in range(40))}]  # 43 tokens = 10 blocks of 4
    first = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)  # type: ignore[arg-type]
    second = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)  # type: ignore[arg-type]
    assert first.usage and second.usage and first.usage.prompt_tokens_details and second.usage.prompt_tokens_details
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 40
    _, stats = http_json("GET", f"{sim.url}/sim/stats")
    pc = stats["prefix_cache"]
    assert pc["hits"] >= 1 and pc["cached_tokens"] >= 40 and pc["prompt_tokens"] >= 86 and pc["lookups"] >= 2


def test_errors(sim: Proc, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e404:
        client.chat.completions.create(model="nope", messages=MSGS)
    assert "nope" in str(e404.value)
    status, body = http_json("POST", f"{sim.url}/v1/chat/completions", {"model": "nope", "messages": MSGS})
    assert status == 404 and body["error"]["code"] == 404 and body["object"] == "error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    cases = [
        b"{not json",
        {"model": MODEL},
        {"model": MODEL, "messages": []},
        {"model": MODEL, "messages": MSGS, "max_tokens": 0},
        {"messages": MSGS},
        [1, 2],
    ]
    for bad in cases:
        status, body = http_json("POST", f"{sim.url}/v1/chat/completions", bad)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (bad, body)
    status, body = http_json("POST", f"{sim.url}/v1/completions", {"model": MODEL})
    assert status == 400
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=-1)


def test_generate_responses_embeddings(sim: Proc, client: openai.OpenAI) -> None:
    status, body = http_json("POST", f"{sim.url}/generate", {"prompt": "a b c", "max_tokens": 3})
    assert status == 200 and body["text"] == output_text(output_words("a b c", 3))
    assert body["meta_info"]["completion_tokens"] == 3 and body["meta_info"]["finish_reason"] == {"type": "length"}
    assert len(body["output_ids"]) == 3
    status, _, raw = raw_post(f"{sim.url}/generate", {"input_ids": [1, 2, 3], "max_tokens": 2, "stream": True})
    events = [e[6:] for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and len(events) == 3
    assert json.loads(events[1])["meta_info"]["finish_reason"] == {"type": "length"}

    resp = client.responses.create(model=MODEL, input="hello world", max_output_tokens=4)
    assert resp.status == "completed" and len(tokenize(resp.output_text)) == 4
    assert resp.usage is not None and resp.usage.output_tokens == 4
    deltas = [
        ev.delta
        for ev in client.responses.create(model=MODEL, input="hello world", max_output_tokens=4, stream=True)
        if ev.type == "response.output_text.delta"
    ]
    assert "".join(deltas) == resp.output_text

    emb = client.embeddings.create(model=MODEL, input=["x y", "z"])
    again = client.embeddings.create(model=MODEL, input="x y")
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 32
    assert emb.data[0].embedding == again.data[0].embedding != emb.data[1].embedding
    assert abs(sum(v * v for v in emb.data[1].embedding) - 1.0) < 1e-3


def test_metrics_after_traffic(sim: Proc, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    with urllib.request.urlopen(f"{sim.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    lab = f'engine="0",model_name="{MODEL}"'
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    for gauge in ("num_requests_running", "num_requests_waiting", "gpu_cache_usage_perc", "prefix_cache_hit_rate"):
        assert f"# TYPE lmdeploy:{gauge} gauge" in text and f"lmdeploy:{gauge}{{{lab}}}" in values
    assert values[f"lmdeploy:prompt_tokens_total{{{lab}}}"] > 0
    assert values[f"lmdeploy:generation_tokens_total{{{lab}}}"] >= 2
    assert f"lmdeploy:cached_tokens_total{{{lab}}}" in values
    assert values[f'lmdeploy:request_success_total{{{lab},finished_reason="ResponseType.FINISH"}}'] >= 1
    assert values[f"lmdeploy:time_to_first_token_seconds_count{{{lab}}}"] >= 1
    assert values[f'lmdeploy:time_to_first_token_seconds_bucket{{{lab},le="+Inf"}}'] >= 1


def test_abort_request(sim: Proc) -> None:
    status, body = http_json("POST", f"{sim.url}/abort_request", {"session_id": 123456})
    assert status == 200 and body == {"aborted": 0}
    status, _ = http_json("POST", f"{sim.url}/abort_request", {"session_id": "x"})
    assert status == 400


def test_lmdeploy_request_checks(sim: Proc, client: openai.OpenAI) -> None:
    for extra in ({"top_p": 0}, {"top_k": -1}, {"temperature": 3}, {"n": 0}):
        status, body = http_json("POST", f"{sim.url}/v1/chat/completions", {"model": MODEL, "messages": MSGS, **extra})
        assert status == 400, (extra, body)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        max_tokens=100_000,
        stream=True,
        extra_body={"session_id": 99},
    )
    with stream:
        next(iter(stream))
        status, body = http_json(
            "POST",
            f"{sim.url}/v1/chat/completions",
            {"model": MODEL, "messages": MSGS, "session_id": 99, "max_tokens": 1},
        )
        assert status == 400 and "occupied" in body["error"]["message"]
    wait_until(lambda: http_json("GET", f"{sim.url}/sim/stats")[1]["requests"]["active"] == 0, timeout=5)
    status, _ = http_json(
        "POST", f"{sim.url}/v1/chat/completions", {"model": MODEL, "messages": MSGS, "session_id": 99, "max_tokens": 1}
    )
    assert status == 200


def test_multi_round_conversation_hits_the_previous_answer(client: openai.OpenAI) -> None:
    history = [{"role": "user", "content": "tell me a long story about caches"}]
    r1 = client.chat.completions.create(model=MODEL, messages=history, max_tokens=30)  # type: ignore[arg-type]
    history += [
        {"role": "assistant", "content": r1.choices[0].message.content or ""},
        {"role": "user", "content": "and then?"},
    ]
    r2 = client.chat.completions.create(model=MODEL, messages=history, max_tokens=3)  # type: ignore[arg-type]
    assert r1.usage and r2.usage and r2.usage.prompt_tokens_details
    done = r1.usage.prompt_tokens + 30  # round 1's prompt and answer are round 2's prefix
    assert r2.usage.prompt_tokens_details.cached_tokens == done // 4 * 4
