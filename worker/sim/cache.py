"""A block prefix cache, like LMDeploy's / vLLM's automatic prefix caching.

Tokens are grouped into blocks of `block_size`; only full blocks are cached.  Block i's hash covers its own
tokens and block i-1's hash (a chain), so equal hashes mean equal prefixes.  A prompt's cached tokens are the
tokens of its longest run of leading blocks that are all in the cache.  Capacity is counted in blocks and
evicted least-recently-used; looking a prompt up refreshes the blocks it hit, a chain's head last, so old
chains lose their tails before their heads.

Hashes use Python's `hash()` of tuples: fast, stable for the life of one process (the cache never leaves it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


def block_hashes(tokens: Sequence[str], block_size: int, start_block: int = 0, prev: int = 0) -> list[int]:
    """Chained hashes of the full blocks of `tokens`, from block `start_block` on (whose predecessor is `prev`)."""
    out: list[int] = []
    n_full = len(tokens) // block_size
    for b in range(start_block, n_full):
        prev = hash((prev, tuple(tokens[b * block_size : (b + 1) * block_size])))
        out.append(prev)
    return out


@dataclass
class CacheStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # prompts with at least one cached block
    cached_tokens: int = 0
    prompt_tokens: int = 0
    evicted_blocks: int = 0

    def as_dict(self) -> dict[str, float]:
        rate = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return {
            "lookups": self.lookups,
            "hits": self.hits,
            "cached_tokens": self.cached_tokens,
            "prompt_tokens": self.prompt_tokens,
            "hit_rate": rate,
            "evicted_blocks": self.evicted_blocks,
        }


class PrefixCache:
    """LRU set of chained block hashes with a capacity in blocks; `enabled=False` makes every lookup miss."""

    def __init__(self, block_size: int = 64, capacity_blocks: int = 1024, enabled: bool = True) -> None:
        if block_size < 1 or capacity_blocks < 0:
            raise ValueError("block_size must be >= 1 and capacity_blocks >= 0")
        self.block_size = block_size
        self.capacity = capacity_blocks
        self.enabled = enabled and capacity_blocks > 0
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, h: int) -> bool:
        return h in self._blocks

    def hashes(self, tokens: Sequence[str]) -> list[int]:
        return block_hashes(tokens, self.block_size) if self.enabled else []

    def match(self, hashes: Sequence[int], prompt_len: int) -> int:
        """Cached tokens for a prompt of `prompt_len` tokens with these block hashes; refreshes hit blocks.

        At least one prompt token is always computed (as real engines do, to produce logits), so a fully
        cached prompt reports one block fewer when its length is a multiple of the block size.
        """
        self.stats.lookups += 1
        self.stats.prompt_tokens += prompt_len
        if not self.enabled or prompt_len <= 0:
            return 0
        limit = (prompt_len - 1) // self.block_size
        n = 0
        blocks = self._blocks
        for h in hashes[:limit]:
            if h not in blocks:
                break
            n += 1
        # Refresh the tail first so a chain's head ends up most recent: eviction then trims chains from
        # their ends (like a radix tree evicting leaves) instead of orphaning a still-cached tail.
        for h in reversed(hashes[:n]):
            blocks.move_to_end(h)
        cached = n * self.block_size
        if cached:
            self.stats.hits += 1
            self.stats.cached_tokens += cached
        return cached

    def insert(self, hashes: Sequence[int]) -> None:
        """Add (or refresh) blocks, evicting least-recently-used ones beyond capacity."""
        if not self.enabled:
            return
        blocks = self._blocks
        for h in reversed(hashes):  # head most recent, see match()
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        over = len(blocks) - self.capacity
        for _ in range(max(0, over)):
            blocks.popitem(last=False)
        if over > 0:
            self.stats.evicted_blocks += over

    def clear(self) -> None:
        self._blocks.clear()

    def usage(self) -> float:
        return len(self._blocks) / self.capacity if self.capacity else 0.0
