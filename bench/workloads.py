"""Seeded, reproducible workloads: each turns its options into request specs (or, for multi-round, into users
whose next round is built from the answer the server actually returned).

A token is a whitespace word (what the simulated worker counts), drawn from a fixed vocabulary.
"""

from __future__ import annotations

import functools
import json
import random
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACE_BLOCK_TOKENS = 512  # the Mooncake trace's hash_ids cover 512-token blocks

_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """A fixed list of 1,960 pronounceable two-syllable lowercase words (no RNG: the same on every machine)."""
    syllables = [o + v for o in _ONSETS for v in _VOWELS]
    return tuple(a + b for a in syllables for b in syllables[:14])


def words(rng: random.Random, n: int) -> str:
    """`n` words (tokens) from the vocabulary, joined by single spaces."""
    if n <= 0:
        return ""
    return " ".join(rng.choices(vocabulary(), k=n))


def sub_rng(seed: int, *labels: object) -> random.Random:
    """An RNG that depends only on the seed and the labels, so one part of a workload never shifts another."""
    key = ":".join([str(seed), *map(str, labels)]).encode()
    return random.Random(zlib.crc32(key) ^ (seed << 32))


@dataclass
class RequestSpec:
    """One chat request to send. `arrival` is seconds from the start (None: when a closed-loop slot frees)."""

    index: int
    messages: list[dict[str, str]]
    max_tokens: int
    arrival: float | None = None
    session: str | None = None  # affinity key: user for multi-round, group for shared-prefix (ideal pinning)
    headers: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    prompt_tokens: int = 0  # words in the messages, before any chat template


# --- run salt ---------------------------------------------------------------------------------------------


def new_salt() -> str:
    """A run marker: 6 random hex digits."""
    return secrets.token_hex(3)


def salt_marker(salt: str) -> str:
    """The line a salted run puts in front of every prompt: `[run 3fa9c2]`."""
    return f"[run {salt}]"


def salt_messages(messages: list[dict[str, str]], salt: str | None) -> list[dict[str, str]]:
    """`messages` with the run marker line at the very start of the first message's content (before the system
    prompt, when there is one); `messages` itself when `salt` is None. A copy: the workload's own messages (a
    multi-round user's history) stay unsalted.

    Every prompt of one run gets the same marker, so whatever the run's prompts share (one system prompt across
    sessions, a session's history across its rounds) they still share, marker included; and since a prefix cache
    chains each block to the blocks before it, no block of one run's prompts matches another run's. A server
    whose cache pages are smaller than its chat template's opening (a radix tree with pages of one token) can
    still match those few template tokens, which come before the marker. The marker costs a few tokens (two
    whitespace words, which is what the simulator counts)."""
    if salt is None or not messages:
        return messages
    first = messages[0]
    return [{**first, "content": f"{salt_marker(salt)}\n{first.get('content', '')}"}, *messages[1:]]


# --- arrivals ---------------------------------------------------------------------------------------------


def poisson_arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """Offsets (s) of `n` Poisson arrivals at `rate` per second, the first at 0."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


def apply_arrivals(specs: list[RequestSpec], arrival: str, rate: float | None, seed: int) -> list[RequestSpec]:
    """Set each spec's arrival for `poisson` (needs rate) or `closed` (None); `trace` keeps what is there."""
    if arrival == "poisson":
        if not rate:
            raise ValueError("--arrival poisson needs --rate")
        for spec, t in zip(specs, poisson_arrivals(len(specs), rate, sub_rng(seed, "arrivals")), strict=True):
            spec.arrival = t
    elif arrival == "closed":
        for spec in specs:
            spec.arrival = None
    elif arrival != "trace":
        raise ValueError(f"unknown arrival {arrival!r}")
    return specs


# --- static workloads -------------------------------------------------------------------------------------


def shared_prefix(
    groups: int, prompts_per_group: int, system_tokens: int, question_tokens: int, output_tokens: int, seed: int = 0
) -> list[RequestSpec]:
    """SGLang bench_serving style: each group shares one system prompt; questions differ. Sent in a seeded
    shuffled order: a router must find the group again (a fixed interleave would let round-robin pin groups by
    accident whenever the group count is a multiple of the worker count)."""
    systems = [words(sub_rng(seed, "system", g), system_tokens) for g in range(groups)]
    order = [(g, q) for q in range(prompts_per_group) for g in range(groups)]
    sub_rng(seed, "order").shuffle(order)
    specs: list[RequestSpec] = []
    for g, q in order:
        question = words(sub_rng(seed, "question", g, q), question_tokens)
        specs.append(
            RequestSpec(
                index=len(specs),
                max_tokens=output_tokens,
                session=f"group-{g}",
                messages=[{"role": "system", "content": systems[g]}, {"role": "user", "content": question}],
                prompt_tokens=system_tokens + question_tokens,
            )
        )
    return specs


def random_requests(num_requests: int, input_tokens: int, output_tokens: int, seed: int = 0) -> list[RequestSpec]:
    """Independent prompts with nothing shared (beyond whatever chat template the server adds)."""
    return [
        RequestSpec(
            index=i,
            max_tokens=output_tokens,
            session=f"req-{i}",
            prompt_tokens=input_tokens,
            messages=[{"role": "user", "content": words(sub_rng(seed, "random", i), input_tokens)}],
        )
        for i in range(num_requests)
    ]


# --- Mooncake trace ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def read_trace(path: str | Path, max_requests: int | None = None) -> list[TraceRecord]:
    """Read a Mooncake jsonl trace (timestamp ms, input_length, output_length, hash_ids)."""
    out: list[TraceRecord] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            if max_requests is not None and len(out) >= max_requests:
                break
            d: dict[str, Any] = json.loads(line)
            out.append(
                TraceRecord(
                    float(d["timestamp"]),
                    int(d["input_length"]),
                    int(d["output_length"]),
                    tuple(int(h) for h in d["hash_ids"]),
                )
            )
    return out


def scaled_block(token_scale: float) -> int:
    return max(1, round(TRACE_BLOCK_TOKENS * token_scale))


def block_tokens(rec: TraceRecord, token_scale: float = 1.0) -> list[tuple[int, int]]:
    """(hash id, tokens of the prompt it covers) per block, after scaling; the last block may be partial."""
    block = scaled_block(token_scale)
    length = max(1, round(rec.input_length * token_scale))
    out = []
    for i, h in enumerate(rec.hash_ids):
        n = min(block, length - i * block)
        if n <= 0:
            break
        out.append((h, n))
    return out


def hit_rate_upper_bound(records: Iterable[TraceRecord], token_scale: float = 1.0) -> float:
    """Prompt-token share a fleet with one infinite shared cache could serve from cache: a block counts as a hit
    when it and every block before it in the prompt were seen in an earlier request (prefix caching)."""
    seen: set[int] = set()
    hits = total = 0
    for rec in records:
        prefix_ok = True
        blocks = block_tokens(rec, token_scale)
        for h, n in blocks:
            prefix_ok = prefix_ok and h in seen
            hits += n if prefix_ok else 0
            total += n
        total += max(0, round(rec.input_length * token_scale) - sum(n for _, n in blocks))
        seen.update(h for h, _ in blocks)
    return hits / total if total else 0.0


def trace_requests(
    records: list[TraceRecord], time_scale: float = 1.0, token_scale: float = 1.0, seed: int = 0
) -> list[RequestSpec]:
    """Expand trace records into prompts: each hash id is a fixed block of words (same id, same text), cut or
    padded (with request-unique words) to the scaled input length; arrivals are the timestamps × time_scale."""
    block = scaled_block(token_scale)
    cache: dict[int, list[str]] = {}
    specs = []
    t0 = records[0].timestamp_ms if records else 0.0
    for i, rec in enumerate(records):
        length = max(1, round(rec.input_length * token_scale))
        parts: list[str] = []
        for h in rec.hash_ids:
            if len(parts) >= length:
                break
            if h not in cache:
                cache[h] = words(sub_rng(seed, "block", h), block).split(" ")
            parts.extend(cache[h])
        if len(parts) < length:
            parts.extend(words(sub_rng(seed, "pad", i), length - len(parts)).split(" "))
        del parts[length:]
        key = "-".join(map(str, rec.hash_ids[:2]))
        specs.append(
            RequestSpec(
                index=i,
                messages=[{"role": "user", "content": " ".join(parts)}],
                max_tokens=max(1, round(rec.output_length * token_scale)),
                arrival=(rec.timestamp_ms - t0) / 1000.0 * time_scale,
                session=f"prefix-{key}",
                prompt_tokens=length,
            )
        )
    return specs


# --- multi-round QA ---------------------------------------------------------------------------------------


@dataclass
class MultiroundConfig:
    users: int = 32
    rounds: int = 6
    system_tokens: int = 1000
    first_doc_tokens: int = 1000
    question_tokens: int = 50
    answer_tokens: int = 100
    think_time: float = 1.0  # mean seconds between an answer and the user's next question (exponential)
    session_header: bool = True
    seed: int = 0


class MultiroundUser:
    """One user's conversation. Round r's prompt is the system prompt + all earlier questions and the answers
    the server actually returned, so it is built lazily: call `next_request(previous_answer)`."""

    def __init__(self, cfg: MultiroundConfig, user: int, system_text: str) -> None:
        self.cfg = cfg
        self.user = user
        self.name = f"user-{user}"
        self.rng = sub_rng(cfg.seed, "user", user)
        self.round = 0
        doc = words(self.rng, cfg.first_doc_tokens)
        self.doc = doc + "\n" if doc else ""
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system_text}]
        self.prompt_tokens = cfg.system_tokens

    def start_offset(self) -> float:
        """Stagger users over the first think time so they do not all ask on the same tick."""
        return self.rng.uniform(0.0, self.cfg.think_time) if self.cfg.think_time > 0 else 0.0

    def think(self) -> float:
        return self.rng.expovariate(1.0 / self.cfg.think_time) if self.cfg.think_time > 0 else 0.0

    def next_request(self, previous_answer: str | None, index: int) -> RequestSpec | None:
        """The next round's request, or None when the conversation is over."""
        if self.round >= self.cfg.rounds:
            return None
        if self.round > 0:
            answer = previous_answer or ""
            self.messages.append({"role": "assistant", "content": answer})
            self.prompt_tokens += len(answer.split())
        question = words(self.rng, self.cfg.question_tokens)
        if self.round == 0:
            question = self.doc + question
            self.prompt_tokens += self.cfg.first_doc_tokens
        self.messages.append({"role": "user", "content": question})
        self.prompt_tokens += self.cfg.question_tokens
        self.round += 1
        headers = {"X-Session-ID": self.name} if self.cfg.session_header else {}
        return RequestSpec(
            index=index,
            messages=list(self.messages),
            max_tokens=self.cfg.answer_tokens,
            session=self.name,
            headers=headers,
            user=self.name,
            prompt_tokens=self.prompt_tokens,
        )


def multiround_users(cfg: MultiroundConfig) -> list[MultiroundUser]:
    """All users; they share one system prompt (the cross-user prefix a cache-aware router can exploit)."""
    system_text = words(sub_rng(cfg.seed, "system"), cfg.system_tokens)
    return [MultiroundUser(cfg, k, system_text) for k in range(cfg.users)]
