"""Block hashes and the approximate prefix index (pure: no event loop)."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from turbofleet.balancer.prefix import PrefixIndex, block_hashes


def chain(tag: str, n: int, start: int = 0) -> tuple[int, ...]:
    """n distinct fake chained hashes; chains with different tags share nothing."""
    return tuple(zlib.crc32(f"{tag}:{i}".encode()) | 1 << 40 for i in range(start, start + n))


# --- block_hashes ---


def test_block_hashes_covers_only_full_blocks() -> None:
    assert block_hashes("", 4) == ()
    assert block_hashes("abc", 4) == ()
    assert len(block_hashes("abcd", 4)) == 1
    assert len(block_hashes("a" * 4099, 512)) == 8


def test_block_hashes_are_chained() -> None:
    text = "".join(chr(97 + i % 26) for i in range(40))
    base = block_hashes(text, 8)
    # a change in block 2 keeps blocks 0-1 and changes every later block
    changed = block_hashes(text[:17] + "#" + text[18:], 8)
    assert changed[:2] == base[:2]
    assert all(a != b for a, b in zip(changed[2:], base[2:], strict=True))
    # the same block text at another position hashes differently (it includes what came before)
    rep = block_hashes("abcdefgh" * 3, 8)
    assert len(set(rep)) == 3
    # a prompt that extends another shares its hashes
    assert block_hashes(text + "more text", 8)[: len(base)] == base


def test_block_hashes_are_stable_across_processes() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 30
    code = f"from turbofleet.balancer.prefix import block_hashes; print(block_hashes({text!r}, 64))"
    env_out = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip()
        for seed in ("1", "2")
    ]
    assert env_out[0] == env_out[1] == str(block_hashes(text, 64))
    # and they are the documented formula: depth in the high bits, CRC-32 of the whole prefix below
    data = text.encode()
    assert block_hashes(text, 64)[2] == 3 << 32 | zlib.crc32(data[:192])


def test_block_hashes_accept_any_text() -> None:
    assert len(block_hashes("é" * 300, 100)) == 6  # UTF-8 bytes: 600
    assert len(block_hashes("x\ud800" * 100, 64)) >= 1  # a lone surrogate from a JSON body
    with pytest.raises(ValueError):
        block_hashes("abc", 0)


# --- PrefixIndex: matching ---


def test_match_longest_prefix_per_worker() -> None:
    idx = PrefixIndex()
    doc = chain("doc", 10)
    idx.insert("a", doc)
    idx.insert("b", doc[:4])
    assert idx.match("a", doc) == 10
    assert idx.match("b", doc) == 4
    assert idx.match("c", doc) == 0
    assert idx.match("a", doc[:3] + chain("x", 5)) == 3
    assert idx.match("a", ()) == 0
    assert idx.match_all(doc) == {"a": 10, "b": 4}
    assert idx.match_all(doc, ["b", "c"]) == {"b": 4}
    assert idx.match_all(chain("none", 3)) == {}


def test_match_groups_come_deepest_first_with_masks() -> None:
    idx = PrefixIndex()
    shared = chain("sys", 6)
    idx.insert("a", shared + chain("A", 4))
    idx.insert("b", shared + chain("B", 2))
    idx.insert("c", shared)
    query = shared + chain("A", 8)
    groups = idx.match_groups(query)
    assert [d for d, _ in groups] == [10, 6]
    assert list(idx.members(groups[0][1])) == ["a"]
    assert set(idx.members(groups[1][1])) == {"a", "b", "c"}
    assert idx.match_all(query) == {"a": 10, "b": 6, "c": 6}


def test_match_all_agrees_with_per_worker_match_on_random_fleets() -> None:
    import random

    rng = random.Random(4)
    for _ in range(50):
        idx = PrefixIndex()
        chains = [chain(f"c{k}", rng.randint(1, 40)) for k in range(4)]
        workers = [f"w{i}" for i in range(rng.randint(1, 20))]
        for wid in workers:
            for _ in range(rng.randint(0, 3)):
                c = rng.choice(chains)
                idx.insert(wid, c[: rng.randint(1, len(c))])
        for c in chains:
            query = c + chain("tail", rng.randint(0, 4))
            expected = {wid: idx.match(wid, query) for wid in workers if idx.match(wid, query)}
            assert idx.match_all(query) == expected


# --- PrefixIndex: bounds, eviction, forgetting ---


def test_lru_bounds_each_worker_and_evicts_least_recent() -> None:
    idx = PrefixIndex(max_blocks=10, min_blocks=2)
    old, new = chain("old", 6), chain("new", 6)
    idx.insert("a", old)
    idx.insert("a", new)
    assert idx.blocks("a") == 10
    # the older prompt lost its *tail* (as a radix cache evicts leaves), so its head still matches
    assert idx.match("a", old) == 4
    assert idx.match("a", new) == 6
    idx.insert("b", old)
    assert idx.blocks("b") == 6 and len(idx) == 12
    for k in range(20):
        idx.insert("a", chain(f"more{k}", 3))
        assert idx.blocks("a") <= 10
    assert idx.match("a", old) == 0
    assert idx.match_all(old) == {"b": 6}


def test_touch_refreshes_recency() -> None:
    idx = PrefixIndex(max_blocks=8, min_blocks=2)
    keep, drop = chain("keep", 4), chain("drop", 4)
    idx.insert("a", keep)
    idx.insert("a", drop)
    idx.insert("a", keep)  # used again: now the most recent
    idx.insert("a", chain("x", 4))
    assert idx.match("a", keep) == 4
    assert idx.match("a", drop) == 0


def test_remove_and_forget_free_everything() -> None:
    idx = PrefixIndex()
    doc = chain("doc", 5)
    idx.insert("a", doc)
    idx.insert("b", doc)
    assert idx.remove("a", doc[3:]) == 2
    assert idx.match("a", doc) == 3
    assert idx.remove("nobody", doc) == 0
    idx.forget("b")
    assert idx.match_all(doc) == {"a": 3}
    assert idx.blocks("b") == 0 and "b" not in idx.workers()
    idx.forget("a")
    assert len(idx) == 0
    # freed bits are reused by newcomers
    idx.insert("c", doc)
    assert idx.bit("c") == 1 and idx.match_all(doc) == {"c": 5}
    idx.forget("missing")


def test_age_and_confirmation() -> None:
    idx = PrefixIndex()
    doc = chain("doc", 4)
    idx.insert("a", doc, confirmed=False)
    assert idx.age("a", doc[0]) == 0
    assert idx.age("a", doc[0], confirmed=True) is None
    idx.insert("a", doc[:2])
    assert idx.age("a", doc[0], confirmed=True) == 0
    assert idx.age("a", doc[3]) == 5
    idx.insert("a", doc, confirmed=False)  # an optimistic touch never unconfirms
    assert idx.age("a", doc[0], confirmed=True) == 0
    assert idx.age("a", 12345) is None and idx.age("zz", doc[0]) is None


# --- PrefixIndex: correction from the worker's cached_tokens ---


def test_correct_drops_blocks_the_worker_no_longer_had() -> None:
    idx = PrefixIndex()
    doc = chain("doc", 20)
    idx.insert("a", doc)
    # 20 blocks of ~100 tokens (+ a partial tail): the worker only had the first 8 blocks
    over = idx.correct("a", doc, cached_tokens=800, prompt_tokens=2050)
    assert over == 12
    assert idx.match("a", doc) == 8


def test_correct_tolerates_engine_rounding_and_agreement() -> None:
    idx = PrefixIndex()
    doc = chain("doc", 20)
    idx.insert("a", doc)
    # engines cache whole engine blocks, never the last token: a little short is not an eviction
    assert idx.correct("a", doc, cached_tokens=1984, prompt_tokens=2050) == 0
    assert idx.correct("a", doc, cached_tokens=1900, prompt_tokens=2050) == 0
    assert idx.match("a", doc) == 20
    assert idx.correct("a", doc, cached_tokens=0, prompt_tokens=0) == 0
    assert idx.correct("zz", doc, cached_tokens=0, prompt_tokens=100) == 0


def test_correct_learns_capacity_down_and_up() -> None:
    idx = PrefixIndex(max_blocks=1000, min_blocks=10)
    olds = [chain(f"old{k}", 10) for k in range(8)]
    for old in olds:
        idx.insert("a", old)
    for k in range(30):
        idx.insert("a", chain(f"n{k}", 10))

    def evicted(old: tuple[int, ...]) -> None:
        # routed when the deepest block had this age; the worker had none of it
        age = idx.age("a", old[9], confirmed=True)
        assert age is not None
        idx.correct("a", old, cached_tokens=0, prompt_tokens=1050, predicted_blocks=10, predicted_age=age)

    # the worker had evicted blocks ~300-370 touches old: capacity shrinks towards that, at most half at once
    evicted(olds[7])
    assert idx.capacity("a") == 500
    assert idx.match("a", olds[7]) == 0  # and the evicted blocks are gone from the index
    age = idx.age("a", olds[6][9])
    evicted(olds[6])
    assert age is not None and idx.capacity("a") == age
    assert idx.blocks("a") <= age
    # a block touched again after routing (so the worker may have it again) teaches nothing
    idx.insert("a", chain("again", 10))
    before = idx.capacity("a")
    idx.correct("a", chain("again", 10), cached_tokens=0, prompt_tokens=1050, predicted_blocks=10, predicted_age=99)
    assert idx.capacity("a") == before
    # a worker that had more than the index listed: grow back
    fresh = chain("fresh", 10)
    idx.correct("a", fresh, cached_tokens=1000, prompt_tokens=1050, predicted_blocks=0)
    assert idx.capacity("a") == before + 10
    # never below min_blocks
    for k in range(8):
        tiny = chain(f"tiny{k}", 10)
        idx.insert("a", tiny)
        idx.correct("a", tiny, cached_tokens=0, prompt_tokens=1050, predicted_blocks=10, predicted_age=0)
    assert idx.capacity("a") == 10


def test_index_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(max_blocks=0)
