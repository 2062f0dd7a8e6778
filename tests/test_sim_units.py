"""Pure unit tests of the simulator's parts: tokenizer, prefix cache, fault specs, wire formats."""

from __future__ import annotations

import json
from typing import Any

import pytest

from turbofleet.worker.sim.cache import PrefixCache, block_hashes
from turbofleet.worker.sim.faults import FaultError, FaultState, fault_from_dict, parse_fault_spec
from turbofleet.worker.sim.formats import ChatFormat, CompletionFormat, GenerateFormat, error_body, usage_dict
from turbofleet.worker.sim.tokens import (
    PromptError,
    output_text,
    output_words,
    render_chat,
    render_completion,
    tokenize,
)


def words(n: int, tag: str = "w") -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


# -- tokenizer -----------------------------------------------------------------------------------------------
def test_chat_rendering_is_a_textual_extension_across_rounds() -> None:
    r1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    p1 = render_chat(r1)
    assert p1 == "<|system|> be brief <|user|> hi there <|assistant|>"
    answer = output_text(output_words(p1, 7))
    r2 = [*r1, {"role": "assistant", "content": answer}, {"role": "user", "content": "more"}]
    p2 = render_chat(r2)
    assert p2.startswith(p1 + " " + answer + " ")
    assert tokenize(p2)[: len(tokenize(p1)) + 7] == tokenize(p1) + tokenize(answer)


def test_content_parts_and_errors() -> None:
    msg = [{"role": "user", "content": [{"type": "text", "text": "a b"}, {"type": "image_url"}, "c"]}]
    assert render_chat(msg) == "<|user|> a b c <|assistant|>"
    assert render_chat("plain") == "<|user|> plain <|assistant|>"
    for bad in ([], None, [{"content": "x"}], [{"role": "user", "content": 5}], ""):
        with pytest.raises(PromptError):
            render_chat(bad)
    assert render_completion("x y") == "x y"
    assert render_completion(["x y"]) == "x y"
    assert render_completion([1, 2, 3]) == "1 2 3"
    bads: tuple[Any, ...] = ("  ", [], ["a", "b"], 3)
    for bad in bads:
        with pytest.raises(PromptError):
            render_completion(bad)


def test_output_is_deterministic_and_exact_length() -> None:
    a = output_words("same prompt", 50)
    assert a == output_words("same prompt", 50)
    assert a != output_words("other prompt", 50)
    assert len(tokenize(output_text(a))) == 50
    assert output_words("p", 0) == []


# -- prefix cache --------------------------------------------------------------------------------------------
def test_block_hashes_are_chained_and_only_full_blocks() -> None:
    a = block_hashes(words(10), 4)
    assert len(a) == 2  # 10 tokens = 2 full blocks + 2 leftover
    b = block_hashes(["x", *words(10)[1:]], 4)
    assert a[0] != b[0] and a[1] != b[1]  # a change in block 0 changes every later hash
    c = block_hashes(words(8) + words(4, "z"), 4)
    assert c[:2] == a and len(c) == 3
    assert block_hashes(words(12), 4, start_block=2, prev=a[1]) == block_hashes(words(12), 4)[2:]


def test_cache_match_counts_longest_cached_prefix() -> None:
    cache = PrefixCache(block_size=4, capacity_blocks=100)
    toks = words(17)
    hs = cache.hashes(toks)
    assert cache.match(hs, len(toks)) == 0
    cache.insert(hs[:2])
    assert cache.match(hs, len(toks)) == 8
    other = words(4, "q") + toks[4:]
    assert cache.match(cache.hashes(other), len(other)) == 0  # same later words, different first block
    cache.insert(hs)
    assert cache.match(hs, len(toks)) == 16
    s = cache.stats
    assert (s.lookups, s.hits, s.cached_tokens, s.prompt_tokens) == (4, 2, 24, 17 * 3 + 17)


def test_cache_keeps_one_token_to_compute() -> None:
    cache = PrefixCache(block_size=4, capacity_blocks=100)
    toks = words(8)
    hs = cache.hashes(toks)
    cache.insert(hs)
    assert cache.match(hs, 8) == 4  # an exact multiple of the block size recomputes its last block


def test_cache_lru_eviction_trims_tails_first() -> None:
    cache = PrefixCache(block_size=2, capacity_blocks=4)
    a = cache.hashes(words(6, "a"))  # 3 blocks
    b = cache.hashes(words(4, "b"))  # 2 blocks
    cache.insert(a)
    cache.insert(b)  # 5 blocks > 4: the oldest entry is a's tail
    assert len(cache) == 4 and a[2] not in cache and a[0] in cache and a[1] in cache
    assert cache.match(a, 7) == 4
    cache.match(a, 7)  # refreshing a makes b the least recent
    cache.insert(cache.hashes(words(4, "c")))
    assert b[1] not in cache and b[0] not in cache
    assert cache.stats.evicted_blocks == 3


def test_cache_disabled_never_hits() -> None:
    cache = PrefixCache(block_size=2, capacity_blocks=10, enabled=False)
    hs = cache.hashes(words(6))
    cache.insert(block_hashes(words(6), 2))
    assert hs == [] and cache.match(block_hashes(words(6), 2), 6) == 0 and len(cache) == 0


# -- faults --------------------------------------------------------------------------------------------------
def test_fault_specs() -> None:
    f = parse_fault_spec("status:429,count=2,retry_after=3")
    assert (f.mode, f.code, f.count, f.retry_after) == ("status", 429, 2, 3.0)
    assert parse_fault_spec("die_after_chunks:5").chunks == 5
    assert parse_fault_spec("slow:2.5").factor == 2.5
    assert parse_fault_spec("refuse,duration_s=1").duration_s == 1.0
    assert fault_from_dict({"mode": "abort_after_chunks", "chunks": 3}).chunks == 3
    for bad in ("nope", "status:abc", "slow:0", "hang,count=0", "hang,foo=1", "status:42", "hang,scope=x"):
        with pytest.raises(FaultError):
            parse_fault_spec(bad)
    with pytest.raises(FaultError):
        fault_from_dict([1])


def test_fault_count_and_scope() -> None:
    changes: list[tuple[object, object]] = []
    st = FaultState(on_change=lambda old, new: changes.append((old, new)))
    st.set(parse_fault_spec("status:503,count=2"))
    assert st.take(inference=False) is None  # scope=inference leaves /health alone
    assert st.take(inference=True) is not None and st.take(inference=True) is not None
    assert st.current is None and st.take(inference=True) is None
    assert len(changes) == 2 and changes[-1][1] is None
    st.set(parse_fault_spec("hang,scope=all"))
    assert st.take(inference=False) is not None
    st.set(parse_fault_spec("slow:2,scope=all"))
    assert st.take(inference=False) is None  # slow does nothing to /health


# -- formats -------------------------------------------------------------------------------------------------
def _events(blob: bytes) -> list[str]:
    assert blob.endswith(b"\n\n")
    return [e.removeprefix("data: ") for e in blob.decode().split("\n\n") if e]


def test_chat_stream_events_are_openai_chunks() -> None:
    fmt = ChatFormat('model "quoted"', include_usage=True)
    w = output_words("x", 3)
    evs = _events(b"".join(fmt.tokens(w, 0, 2) + fmt.tokens(w, 2, 3) + fmt.tail("length", usage_dict(4, 3, 0))))
    assert evs[-1] == "[DONE]"
    chunks = [json.loads(e) for e in evs[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": output_text(w[:1])}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:3]) == output_text(w)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == 'model "quoted"' for c in chunks)
    assert chunks[3]["choices"][0]["finish_reason"] == "length" and chunks[3]["usage"] is None
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["total_tokens"] == 7
    assert len({c["id"] for c in chunks}) == 1


def test_completion_and_generate_formats() -> None:
    w = output_words("y", 2)
    fmt = CompletionFormat("m")
    # CompletionFormat borrows ChatFormat.tokens (same bytes layout), which mypy cannot see through
    toks = fmt.tokens(w, 0, 2)  # type: ignore[misc]
    chunks = [json.loads(e) for e in _events(b"".join(toks + fmt.tail("length", {})))[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == output_text(w)
    assert "usage" not in chunks[0]
    body = json.loads(fmt.full(w, "length", usage_dict(3, 2, 1)))
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 1
    g = GenerateFormat("m", prompt_tokens=5)
    g.max_tokens = 2
    evs = [json.loads(e) for e in _events(b"".join(g.tokens(w, 0, 2)))]
    assert evs[-1]["meta_info"]["finish_reason"] == {"type": "length"} and evs[0]["meta_info"]["prompt_tokens"] == 5


def test_error_body_has_openai_and_lmdeploy_shapes() -> None:
    body = json.loads(error_body(404, "no such model"))
    assert body["error"] == {"message": "no such model", "type": "not_found_error", "param": None, "code": 404}
    assert body["object"] == "error" and body["message"] == "no such model"
