"""Chained block hashes of prompt text, and an approximate per-worker index of the blocks workers cache.

Hash choice: block i's hash is `depth << 32 | crc32(text[:end of block i])`, where the CRC runs on over the
UTF-8 bytes, so it chains by construction (zlib continues a CRC from the previous value). It is *stable*:
the same text gives the same hashes in every process, on every host, in every run, so an index (or a test)
can be shared between proxy replicas. CRC-32 alone is 32 bits; putting the depth in the high bits means two
different prefixes only collide if they have the same length and the same CRC, so with ~10k entries per
depth a false match is about 1 in 400k lookups. Python's `hash()` of str slices is ~20% faster but salted per
process; blake2b is 3x slower. Measured on the dev box: 2k chars ≈ 2 µs, 20k ≈ 20 µs, 100k ≈ 100 µs, most
of it the per-block loop, about as much as `json.loads` of the same body.

The index mirrors, approximately, what each worker's prefix cache holds: per worker an LRU of block hashes
(bounded by a per-worker capacity), plus one map from block hash to the set of workers holding it, so that
longest-prefix matching across the whole fleet costs O(matched blocks), not O(workers x blocks).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence, Set

#: characters (UTF-8 bytes) per block; ~64 tokens of English, the size of an LMDeploy KV block
DEFAULT_BLOCK_CHARS = 256
#: blocks kept per worker: 8192 x 256 chars ≈ 500k tokens of KV; ~400 bytes of index per (worker, block)
DEFAULT_MAX_BLOCKS = 8192
#: the learned capacity never drops below this
DEFAULT_MIN_BLOCKS = 64


def block_hashes(text: str, block_chars: int = DEFAULT_BLOCK_CHARS) -> tuple[int, ...]:
    """Chained, stable hashes of the full `block_chars`-byte blocks of `text` (a partial tail is left out)."""
    if block_chars <= 0:
        raise ValueError("block_chars must be positive")
    # surrogatepass: a JSON body may carry lone surrogates, which strict UTF-8 refuses to encode
    data = text.encode("utf-8", "surrogatepass")
    end = len(data) - len(data) % block_chars
    if not end:
        return ()
    view = memoryview(data)
    crc = zlib.crc32
    out: list[int] = []
    append = out.append
    c = 0
    for depth, start in enumerate(range(0, end, block_chars), 1):
        c = crc(view[start : start + block_chars], c)
        append(depth << 32 | c)
    return tuple(out)


class _Blocks:
    """One worker's blocks: hash -> sequence number of its last touch, least recent first."""

    __slots__ = ("capacity", "lru", "seq")

    def __init__(self, capacity: int) -> None:
        self.lru: OrderedDict[int, int] = OrderedDict()
        self.seq = 0
        self.capacity = capacity


class PrefixIndex:
    """Which workers probably hold which prompt blocks in their prefix cache.

    Approximate by design: it learns only from what this proxy routed and from the `cached_tokens` workers
    report back. Each worker's entry is an LRU bounded by a capacity that starts at `max_blocks` and is
    learned from those reports (`correct`): it shrinks when a worker turns out to have evicted blocks the
    index still listed, and grows back when a worker had more than the index listed.
    """

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS, min_blocks: int = DEFAULT_MIN_BLOCKS) -> None:
        if max_blocks < 1 or min_blocks < 1:
            raise ValueError("max_blocks and min_blocks must be positive")
        self.max_blocks = max_blocks
        self.min_blocks = min(min_blocks, max_blocks)
        self._workers: dict[str, _Blocks] = {}
        self._holders: dict[int, set[str]] = {}

    # --- reads ---
    def __len__(self) -> int:
        """Distinct blocks held by any worker."""
        return len(self._holders)

    def blocks(self, worker_id: str) -> int:
        """How many blocks the index lists for a worker."""
        wb = self._workers.get(worker_id)
        return len(wb.lru) if wb else 0

    def capacity(self, worker_id: str) -> int:
        """The worker's learned capacity in blocks (`max_blocks` until a report says otherwise)."""
        wb = self._workers.get(worker_id)
        return wb.capacity if wb else self.max_blocks

    def workers(self) -> list[str]:
        return list(self._workers)

    def age(self, worker_id: str, block: int) -> int | None:
        """Block touches on the worker since `block` was last touched there; None if not listed."""
        wb = self._workers.get(worker_id)
        if wb is None:
            return None
        seq = wb.lru.get(block)
        return None if seq is None else wb.seq - seq

    def match(self, worker_id: str, hashes: Sequence[int]) -> int:
        """Longest prefix of `hashes`, in blocks, that the worker holds.

        Binary search: because hashes are chained, holding block k means the worker once computed the
        whole prefix up to k, and prefix caches evict leaves first, so holding is monotone along the chain.
        """
        wb = self._workers.get(worker_id)
        if wb is None or not hashes:
            return 0
        lru = wb.lru
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if hashes[mid - 1] in lru:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def match_groups(self, hashes: Sequence[int]) -> list[tuple[int, Set[str]]]:
        """Longest-prefix matches across all workers as `(depth, holders)` groups, deepest first.

        Every worker in a group holds at least `depth` leading blocks; a worker's match is the depth of the
        first (deepest) group it appears in. Costs O(matched blocks) set-size comparisons and never iterates
        the holder sets. The sets are the index's own: read them, do not keep them past the next write.
        """
        if not hashes:
            return []
        holders = self._holders
        prev = holders.get(hashes[0])
        if not prev:
            return []
        groups: list[tuple[int, Set[str]]] = []
        depth = 1
        for i in range(1, len(hashes)):
            cur = holders.get(hashes[i])
            if not cur:
                break
            # a worker left the chain here; equal sizes are taken as the same holders, exact for small sets
            if len(cur) != len(prev) or (len(cur) <= 8 and cur != prev):
                groups.append((depth, prev))
            prev = cur
            depth += 1
        groups.append((depth, prev))
        groups.reverse()
        return groups

    def match_all(self, hashes: Sequence[int], worker_ids: Iterable[str] | None = None) -> dict[str, int]:
        """Longest matched prefix, in blocks, of each worker holding any (only `worker_ids` when given)."""
        only = None if worker_ids is None else set(worker_ids)
        result: dict[str, int] = {}
        for depth, members in self.match_groups(hashes):
            for w in members:
                if w not in result and (only is None or w in only):
                    result[w] = depth
        return result

    # --- writes ---
    def insert(self, worker_id: str, hashes: Sequence[int], start: int = 0) -> None:
        """Record that the worker now holds `hashes` (from block `start` on; the caller knows the rest)."""
        if start >= len(hashes):
            return
        wb = self._workers.get(worker_id)
        if wb is None:
            wb = self._workers[worker_id] = _Blocks(self.max_blocks)
        lru = wb.lru
        move = lru.move_to_end
        holders = self._holders
        seq = wb.seq
        # deepest first, so that the head of a prompt is the most recent and LRU evicts tails first, as a
        # radix-tree prefix cache does; evicting heads first would break every chain that shares them
        for i in range(len(hashes) - 1, start - 1, -1):
            h = hashes[i]
            seq += 1
            if h in lru:
                move(h)
                lru[h] = seq
            else:
                lru[h] = seq
                s = holders.get(h)
                if s is None:
                    holders[h] = {worker_id}
                else:
                    s.add(worker_id)
        wb.seq = seq
        if len(lru) > wb.capacity:
            self._trim(worker_id, wb, wb.capacity)

    def remove(self, worker_id: str, hashes: Iterable[int]) -> int:
        """Drop blocks from a worker's entry; returns how many were listed."""
        wb = self._workers.get(worker_id)
        if wb is None:
            return 0
        lru = wb.lru
        dropped = 0
        for h in hashes:
            if lru.pop(h, None) is not None:
                dropped += 1
                self._unhold(h, worker_id)
        return dropped

    def correct(
        self,
        worker_id: str,
        hashes: Sequence[int],
        cached_tokens: int,
        prompt_tokens: int,
        predicted_blocks: int | None = None,
        predicted_age: int | None = None,
    ) -> int:
        """Reconcile the index with the worker's report of `cached_tokens` for a prompt of `hashes`.

        `predicted_blocks` is what the index matched when the request was routed (default: what it matches
        now). If the worker had fewer blocks, the blocks past the reported point were evicted there: they
        are dropped, and when `predicted_age` (the age of the deepest predicted block at routing time) is
        given, the worker's capacity shrinks to that age, since the worker evicted a block that recent. If
        the worker had more, the index under-estimated it and the capacity grows. Returns the number of
        blocks the index over-claimed (0 when the report agrees or exceeds it).
        """
        n = len(hashes)
        if n == 0 or prompt_tokens <= 0 or cached_tokens < 0:
            return 0
        predicted = self.match(worker_id, hashes) if predicted_blocks is None else predicted_blocks
        # tokens per block from this very prompt; the partial tail block is half a block on average
        per_block = prompt_tokens / (n + 0.5)
        reported = min(n, int(cached_tokens / per_block + 0.5))
        # engines cache whole engine blocks and never the last token: allow a little slack either way
        slack = 1 + predicted // 16
        wb = self._workers.get(worker_id)
        if wb is None:
            return 0
        if reported > predicted + slack:
            wb.capacity = min(self.max_blocks, wb.capacity + (reported - predicted))
            return 0
        if reported >= predicted - slack:
            return 0
        over = predicted - reported
        self.remove(worker_id, hashes[reported:predicted])
        if predicted_age is not None:
            wb.capacity = max(self.min_blocks, min(wb.capacity, predicted_age))
            if len(wb.lru) > wb.capacity:
                self._trim(worker_id, wb, wb.capacity)
        return over

    def forget(self, worker_id: str) -> None:
        """Drop everything listed for a worker."""
        wb = self._workers.pop(worker_id, None)
        if wb is None:
            return
        for h in wb.lru:
            self._unhold(h, worker_id)

    # --- internals ---
    def _trim(self, worker_id: str, wb: _Blocks, keep: int) -> None:
        lru = wb.lru
        while len(lru) > keep:
            h, _ = lru.popitem(last=False)
            self._unhold(h, worker_id)

    def _unhold(self, h: int, worker_id: str) -> None:
        s = self._holders.get(h)
        if s is not None:
            s.discard(worker_id)
            if not s:
                del self._holders[h]
