"""bench/gpu_calibrate.py's conversation test (issue 14) against the sim served in-process: a chat's second turn
carries the first turn's prompt and the server's own answer, and is served from the cache."""

from __future__ import annotations

import argparse
import time
from typing import Any

import aiohttp

from tests.sim_app_kit import MODEL, serve
from turbofleet.bench.gpu_calibrate import Prompts, conversation, one


def test_word_prompts_are_fresh_and_sized_without_a_tokenizer() -> None:
    p = Prompts(None, seed=1)
    a, b = p.make(300), p.make(300)
    assert a != b and len(a.split(" ")) == 100  # a third of the tokens in words (~3 tokens a word)
    assert all(w.isalpha() for w in a.split(" "))
    assert Prompts(None, seed=1, text="random").make(40).startswith("w")


async def test_conversation_turns_hit_the_first_turns_cache() -> None:
    async with serve() as a, serve() as b:
        urls = [str(a.make_url("")).rstrip("/"), str(b.make_url("")).rstrip("/")]
        args = argparse.Namespace(url=urls[0], also=urls[1:], conv_lengths=[256, 512], conv_reps=2, conv_answer=8,
                                  conv_question=40, think=0.0, decode_prompt=32, conv_load_tokens=20)
        P = Prompts(None, seed=2)
        t0 = time.perf_counter()
        async with aiohttp.ClientSession() as s:

            async def req(url: str, n: int, m: int, prompt: Any = None) -> dict[str, Any]:
                return await one(s, url, MODEL, prompt if prompt is not None else P.make(n), m, t0)

            rows = await conversation(args, P, req, lambda *x: None)
            # the first turn's answer is text the server gave, and is sent back as the assistant's message
            first = [{"role": "user", "content": P.make(256)}]
            got = await req(urls[0], 0, 8, first)
    assert got["text"] and got["ttft"] is not None
    assert [(r["n"], r["busy"]) for r in rows] == [(256, False)] * 2 + [(512, False)] * 2 + [(256, True)] * 2 + [
        (512, True)] * 2
    for r in rows:
        assert r["ttft"] is not None and r["first_ttft"] is not None
        # the whole first prompt is cached (whole blocks of it), the fresh question is not
        assert 0 < r["cached_tokens"] < r["prompt_tokens"]
