"""Measure what the simulator's timing model needs on a real OpenAI-compatible engine (LMDeploy TurboMind).

Run on the GPU machine against running api_servers; writes one JSON of raw measurements that
`python -m turbofleet.worker.sim.fit` turns into a sim-worker profile:

    python -m turbofleet.bench.gpu_calibrate --url http://127.0.0.1:23333 \
        [--also http://127.0.0.1:23334 ...] --tokenizer DIR --model m1b --out calib.json

What it measures, one server at a time unless said (every prompt is fresh, so nothing is cached unless a step
says so; `--text words`, the default, makes prompts of the bench's own vocabulary words, the text every bench
workload sends, cut to the token count; `--text random` decodes random token ids, whose odd pre-tokenized
words the server's tokenizer takes about twice as long per token to encode, a cost that lands in every
fitted per-token term and most in a cache hit's, where nothing else scales with the prompt):
- prefill: TTFT of one request (2 output tokens) on an idle server against prompt length;
- cache hit: the same prompt again (full hit), and the prompt plus a fresh suffix (partial hit);
- conversation turns: a chat's next turn as a multi-round client sends it (its first prompt, the answer the
  server gave, a fresh question), a think time after the answer, alone and while the other servers decode
  one stream each (a GPU kept busy, as in a fleet's run): what a hit of the previous turn really costs;
- decode: the mean interval between tokens of B concurrent streams, against B;
- mixing: TTFT of a long prompt that arrives while B streams decode, and the decoders' longest gap then
  (does a prefill stall the running batch, and by how much); several long prompts at once (are they batched);
- max batch: more streams at once than the engine may run; TTFTs split where admission waits;
- contention: the decode and prefill tests on all servers at once (separate processes time-sharing one GPU).

Only the standard library, aiohttp and `tokenizers` (to make prompts of a known token count).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import time
from typing import Any

import aiohttp


class Prompts:
    """Fresh prompts of about n real tokens: the bench's vocabulary words cut to n tokens (`text="words"`), or
    decoded random token ids (`text="random"`)."""

    def __init__(self, tokenizer_dir: str | None, seed: int = 0, text: str = "words") -> None:
        self.rng = random.Random(seed)
        self.text = text
        self.tok: Any = None
        if tokenizer_dir:
            from tokenizers import Tokenizer  # type: ignore[import-not-found, unused-ignore]

            self.tok = Tokenizer.from_file(f"{tokenizer_dir}/tokenizer.json")

    def make(self, n: int) -> str:
        if self.text == "words":
            from turbofleet.bench.workloads import words

            plain = words(self.rng, max(1, n // 2 + 8))  # ~2.9 real tokens a word: enough to cut n from
            if self.tok is None:
                return " ".join(plain.split(" ")[: max(1, n // 3)])
            cut: str = self.tok.decode(self.tok.encode(plain).ids[:n])
            return cut
        if self.tok is None:
            return " ".join(f"w{self.rng.randrange(1 << 30):x}" for _ in range(max(1, n // 4)))
        ids = [self.rng.randrange(300, 8000) for _ in range(n)]
        text: str = self.tok.decode(ids)
        again = self.tok.encode(text).ids[:n]
        out: str = self.tok.decode(again)
        return out


async def one(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    prompt: str | list[dict[str, str]],
    max_tokens: int,
    t_origin: float,
) -> dict[str, Any]:
    """One streamed chat request (a user prompt, or whole messages): chunk arrival times (s since t_origin),
    the answer's text, usage."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }
    t0 = time.perf_counter()
    times: list[float] = []
    text: list[str] = []
    usage: dict[str, Any] = {}
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            return {"error": resp.status, "text": (await resp.text())[:200]}
        buf = b""
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                line = event.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    continue
                obj = json.loads(payload)
                if obj.get("usage"):
                    usage = obj["usage"]
                for ch in obj.get("choices") or []:
                    if piece := (ch.get("delta") or {}).get("content"):
                        times.append(now - t_origin)
                        text.append(piece)
    details = usage.get("prompt_tokens_details") or {}
    return {
        "start": t0 - t_origin,
        "ttft": (times[0] - (t0 - t_origin)) if times else None,
        "times": times,
        "text": "".join(text),
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": details.get("cached_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
    }


def itl(rec: dict[str, Any], lo: float = 0.2, hi: float = 0.8) -> float | None:
    """Mean interval between chunks over the middle of a stream (s)."""
    t: list[float] = rec.get("times") or []
    if len(t) < 5:
        return None
    a, b = int(len(t) * lo), int(len(t) * hi)
    return (t[b] - t[a]) / max(1, b - a)


def max_gap(rec: dict[str, Any], t_from: float, t_to: float) -> float:
    t: list[float] = rec.get("times") or []
    gaps = [b - a for a, b in itertools.pairwise(t) if b >= t_from and a <= t_to]
    return max(gaps) if gaps else 0.0


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    P = Prompts(args.tokenizer, args.seed, args.text)
    urls = [args.url, *args.also]
    out: dict[str, Any] = {"urls": urls, "model": args.model, "text": args.text}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        T = time.perf_counter()
        u = args.url

        async def req(url: str, n: int, m: int, prompt: str | list[dict[str, str]] | None = None) -> dict[str, Any]:
            return await one(s, url, args.model, prompt if prompt is not None else P.make(n), m, T)

        def log(*a: Any) -> None:
            print(f"[{time.perf_counter() - T:6.1f}s]", *a, flush=True)

        for _ in range(4):  # warm-up
            await req(u, 512, 8)
        # prefill vs prompt length, idle server
        rows = []
        for n in args.lengths:
            for _ in range(args.reps):
                r = await req(u, n, 2)
                rows.append(
                    {"target": n, "prompt": r["prompt_tokens"], "cached": r["cached_tokens"], "ttft": r["ttft"]}
                )
            last = rows[-args.reps :]
            log(
                "prefill",
                n,
                "ttft ms",
                [round(1000 * x["ttft"], 1) for x in last if x["ttft"]],
                "tokens",
                last[-1]["prompt"],
            )
        out["prefill"] = rows
        save(args.out, out)  # partial results survive a timeout
        # cache hits
        rows = []
        for n in args.hit_lengths:
            p = P.make(n)
            cold = await req(u, 0, 2, p)
            full = await req(u, 0, 2, p)
            part = await req(u, 0, 2, p + P.make(args.suffix))
            rows.append({"n": n, "cold": cold, "full": full, "partial": part, "suffix": args.suffix})
            for k in ("cold", "full", "partial"):
                rows[-1][k] = {x: rows[-1][k][x] for x in ("prompt_tokens", "cached_tokens", "ttft")}
            log(
                "hit",
                n,
                {
                    k: (rows[-1][k]["cached_tokens"], round(1000 * (rows[-1][k]["ttft"] or 0), 1))
                    for k in ("cold", "full", "partial")
                },
            )
        out["hits"] = rows
        save(args.out, out)  # partial results survive a timeout
        out["conversation"] = await conversation(args, P, req, log)
        save(args.out, out)  # partial results survive a timeout
        # decode step vs batch size
        rows = []
        for b in args.batches:
            recs = await asyncio.gather(*[req(u, args.decode_prompt, args.decode_tokens) for _ in range(b)])
            steps = [x for x in (itl(r) for r in recs) if x]
            rows.append(
                {
                    "batch": b,
                    "itl_mean": statistics.mean(steps) if steps else None,
                    "itl_p50": statistics.median(steps) if steps else None,
                    "ttft_max": max((r["ttft"] or 0) for r in recs),
                    "tokens": sum((r["completion_tokens"] or 0) for r in recs),
                    "wall": max(r["times"][-1] for r in recs if r.get("times")) - min(r["start"] for r in recs),
                }
            )
            log(
                "decode batch",
                b,
                "itl ms",
                round(1000 * (rows[-1]["itl_mean"] or 0), 2),
                "ttft max",
                round(1000 * rows[-1]["ttft_max"], 1),
            )
        out["decode"] = rows
        save(args.out, out)  # partial results survive a timeout
        # a long prefill arriving while a batch decodes
        rows = []
        for b, n in args.mix:
            dec = [asyncio.create_task(req(u, args.decode_prompt, args.mix_tokens)) for _ in range(b)]
            await asyncio.sleep(args.mix_delay)
            t_in = time.perf_counter() - T
            long = await req(u, n, 2)
            t_out = t_in + (long["ttft"] or 0)
            recs = await asyncio.gather(*dec)
            gaps = [max_gap(r, t_in, t_out + 0.05) for r in recs]
            steps = [x for x in (itl(r) for r in recs) if x]
            rows.append(
                {
                    "batch": b,
                    "prompt": long["prompt_tokens"],
                    "ttft": long["ttft"],
                    "decoder_max_gap": max(gaps),
                    "decoder_itl": statistics.mean(steps) if steps else None,
                }
            )
            log("mix", b, n, {k: rows[-1][k] for k in ("prompt", "ttft", "decoder_max_gap", "decoder_itl")})
        out["mix"] = rows
        save(args.out, out)  # partial results survive a timeout
        # several long prompts at once: batched into one step, or one after another?
        rows = []
        for k, n in args.multi:
            recs = await asyncio.gather(*[req(u, n, 2) for _ in range(k)])
            rows.append({"k": k, "n": n, "ttfts": sorted(r["ttft"] for r in recs), "prompt": recs[0]["prompt_tokens"]})
            log("multi", k, n, [round(1000 * x, 1) for x in rows[-1]["ttfts"]])
        out["multi"] = rows
        save(args.out, out)  # partial results survive a timeout
        # max batch: more streams than the engine runs
        recs = await asyncio.gather(*[req(u, 64, args.maxb_tokens) for _ in range(args.maxb)])
        ttfts = sorted(r["ttft"] or 0 for r in recs)
        out["max_batch_probe"] = {"streams": args.maxb, "tokens": args.maxb_tokens, "ttfts": ttfts}
        save(args.out, out)
        log(
            "max batch probe",
            args.maxb,
            "ttft p10/p50/p90/max ms",
            [round(1000 * ttfts[int(q * (len(ttfts) - 1))], 1) for q in (0.1, 0.5, 0.9, 1.0)],
        )
        # contention: every server at once
        if args.also:
            rows = []
            for b in args.contention_batches:
                recs = await asyncio.gather(
                    *[req(x, args.decode_prompt, args.decode_tokens) for x in urls for _ in range(b)]
                )
                steps = [x for x in (itl(r) for r in recs) if x]
                rows.append(
                    {"servers": len(urls), "batch_each": b, "itl_mean": statistics.mean(steps) if steps else None}
                )
                log("contention decode", len(urls), "x", b, "itl ms", round(1000 * (rows[-1]["itl_mean"] or 0), 2))
            for n in args.contention_prefill:
                recs = await asyncio.gather(*[req(x, n, 2) for x in urls])
                rows.append({"servers": len(urls), "prefill": n, "ttfts": sorted(r["ttft"] for r in recs)})
                log("contention prefill", len(urls), "x", n, [round(1000 * x, 1) for x in rows[-1]["ttfts"]])
            out["contention"] = rows
            save(args.out, out)  # partial results survive a timeout
    return out


async def conversation(args: argparse.Namespace, P: Prompts, req: Any, log: Any) -> list[dict[str, Any]]:
    """A chat's second turn: its first prompt, the server's answer and a fresh question, `--think` s after the
    answer, as a multi-round client sends it. Alone on an idle GPU, then again while every other server
    decodes one stream (`busy`: what a fleet run's GPU looks like). Each row: the turn's prompt and cached
    tokens and TTFT, and its first turn's TTFT."""
    rows: list[dict[str, Any]] = []

    async def keep_busy(url: str) -> None:
        while True:  # one stream after another until the pass ends
            await req(url, args.decode_prompt, args.conv_load_tokens)

    for busy in (False, True) if args.also else (False,):
        load = [asyncio.create_task(keep_busy(x)) for x in args.also] if busy else []
        if busy:
            await asyncio.sleep(0.3)
        for n in args.conv_lengths:
            for _ in range(args.conv_reps):
                first = [{"role": "user", "content": P.make(n)}]
                a = await req(args.url, 0, args.conv_answer, first)
                await asyncio.sleep(args.think)
                turn = [*first, {"role": "assistant", "content": a.get("text") or ""},
                        {"role": "user", "content": P.make(args.conv_question)}]
                b = await req(args.url, 0, 2, turn)
                rows.append({"n": n, "busy": busy, "first_ttft": a.get("ttft"),
                             **{k: b.get(k) for k in ("prompt_tokens", "cached_tokens", "ttft")}})
            last = rows[-args.conv_reps :]
            log("conversation", n, "busy" if busy else "idle", "turn 2 (cached, ttft ms)",
                [(x["cached_tokens"], round(1000 * (x["ttft"] or 0), 1)) for x in last])
        for t in load:
            t.cancel()
        await asyncio.gather(*load, return_exceptions=True)
    return rows


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def pairs(text: str) -> list[tuple[int, int]]:
    """ "32x4096,8x2048" -> [(32, 4096), (8, 2048)]"""
    out = []
    for item in text.split(","):
        a, b = item.split("x")
        out.append((int(a), int(b)))
    return out


def save(path: str, out: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(out, f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--also", action="append", default=[], help="other servers, for the contention test")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", help="dir with tokenizer.json (exact token counts)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", choices=("words", "random"), default="words",
                    help="prompts of the bench's vocabulary words (what its workloads send) or of random token ids")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lengths", type=ints, default=ints("128,512,1024,2048,4096,8192,16384,24576"))
    ap.add_argument("--hit-lengths", type=ints, default=ints("1024,4096,16384"))
    ap.add_argument("--suffix", type=int, default=512)
    ap.add_argument("--conv-lengths", type=ints, default=ints("2048,4096,8192,16384"),
                    help="first-turn prompt lengths of the conversation test")
    ap.add_argument("--conv-reps", type=int, default=3)
    ap.add_argument("--conv-answer", type=int, default=64, help="tokens of the first turn's answer")
    ap.add_argument("--conv-question", type=int, default=200, help="tokens of the second turn's question")
    ap.add_argument("--think", type=float, default=0.5, help="seconds between the answer and the next turn")
    ap.add_argument("--conv-load-tokens", type=int, default=2000,
                    help="tokens of each stream the other servers decode, one after another, in the busy pass")
    ap.add_argument("--batches", type=ints, default=ints("1,2,4,8,16,32,64,128,256"))
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--mix", type=pairs, default=pairs("32x4096,32x16384,128x8192"))
    ap.add_argument("--mix-tokens", type=int, default=300)
    ap.add_argument("--mix-delay", type=float, default=0.5)
    ap.add_argument("--multi", type=pairs, default=pairs("4x4096,8x2048"))
    ap.add_argument("--maxb", type=int, default=320)
    ap.add_argument("--maxb-tokens", type=int, default=64)
    ap.add_argument("--contention-batches", type=ints, default=ints("1,32"))
    ap.add_argument("--contention-prefill", type=ints, default=ints("4096"))
    args = ap.parse_args(argv)
    t0 = time.time()
    out = asyncio.run(main_async(args))
    out["seconds"] = round(time.time() - t0, 1)
    save(args.out, out)
    print(f"wrote {args.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
