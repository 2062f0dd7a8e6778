"""Chained block hashes of prompt text, and an approximate per-worker index of the blocks workers cache.

Hash choice: block i's hash is `depth << 32 | crc32(text[:end of block i])`, where the CRC runs on over the
UTF-8 bytes, so it chains by construction (zlib continues a CRC from the previous value). It is *stable*:
the same text gives the same hashes in every process, on every host, in every run, so an index (or a test)
can be shared between proxy replicas. CRC-32 alone is 32 bits; putting the depth in the high bits means two
different prefixes only collide if they have the same length and the same CRC, so with ~10k entries per
depth a false match is about 1 in 400k lookups. Python's `hash()` of str slices is ~20% faster but salted per
process; blake2b is 3x slower. Cost, measured on the 2-core dev box: about 1 µs per 1,000 characters
(2k chars ≈ 2 µs, 20k ≈ 17 µs, 100k ≈ 80-115 µs), about what `json.loads` of the same body costs.

The index mirrors, approximately, what each worker's prefix cache holds: per worker an LRU of block hashes
(bounded by a per-worker capacity), plus one map from block hash to the workers holding it (a bitmask), so
that longest-prefix matching across the whole fleet costs O(log(blocks)) lookups per distinct match length,
not O(workers x blocks).
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence

#: characters (UTF-8 bytes) per block, ~128 tokens of English (two LMDeploy KV blocks of 64): fine enough
#: for routing, and half the per-request work and index memory of 256
DEFAULT_BLOCK_CHARS = 512
#: blocks kept per worker before any report teaches better: 65536 x 512 chars ≈ 6-8M tokens, more than a GPU
#: holds (the capacity learned from cached_tokens comes down to the worker's real size); the index costs
#: ~225 bytes per (worker, block), so ~15 MB per worker at the bound: lower it for fleets of hundreds
DEFAULT_MAX_BLOCKS = 65536
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
    """One worker's blocks, least recent first: hash -> sequence number of the last touch, negated while
    the block is only optimistically listed (routed there, no response yet)."""

    __slots__ = ("bit", "capacity", "lru", "seq")

    def __init__(self, bit: int, capacity: int) -> None:
        self.bit = bit
        self.lru: OrderedDict[int, int] = OrderedDict()
        self.seq = 0
        self.capacity = capacity


class PrefixIndex:
    """Which workers probably hold which prompt blocks in their prefix cache.

    Approximate by design: it learns only from what this proxy routed and from the `cached_tokens` workers
    report back. Each worker's entry is an LRU bounded by a capacity that starts at `max_blocks` and is
    learned from those reports (`correct`): it shrinks when a worker turns out to have evicted blocks the
    index still listed, and grows back when a worker had more than the index listed.

    Holders are kept as one int bitmask per block (a bit per worker), not a set: set algebra becomes int
    arithmetic, equality is exact and cheap, and the millions of entries a big index holds are ints, which
    the cyclic garbage collector never has to walk (sets would make every full collection a long pause).
    """

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS, min_blocks: int = DEFAULT_MIN_BLOCKS) -> None:
        if max_blocks < 1 or min_blocks < 1:
            raise ValueError("max_blocks and min_blocks must be positive")
        self.max_blocks = max_blocks
        self.min_blocks = min(min_blocks, max_blocks)
        self._workers: dict[str, _Blocks] = {}
        #: block hash -> bitmask of the workers holding it (never 0: empty entries are deleted)
        self._holders: dict[int, int] = {}
        #: bit -> worker id ("" for a free bit); freed bits are reused, lowest first
        self._ids: list[str] = []
        self._free: list[int] = []

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

    def bit(self, worker_id: str) -> int:
        """The worker's mask bit (1 << index), 0 when the index lists nothing for it."""
        wb = self._workers.get(worker_id)
        return 1 << wb.bit if wb else 0

    def members(self, mask: int, start: int = 0) -> Iterator[str]:
        """The worker ids in a holders mask, lowest bit first; with `start`, from bit `start` on, then the
        rest (so that a caller reading only the first few does not always favour the same workers)."""
        ids = self._ids
        if start:
            high = mask >> start << start
            yield from self.members(high)
            mask ^= high
        while mask:
            low = mask & -mask
            yield ids[low.bit_length() - 1]
            mask ^= low

    def age(self, worker_id: str, block: int, confirmed: bool = False) -> int | None:
        """Block touches on the worker since `block` was last touched there; None if not listed (or, with
        `confirmed`, if only listed optimistically, by `insert(..., confirmed=False)`)."""
        wb = self._workers.get(worker_id)
        if wb is None:
            return None
        seq = wb.lru.get(block)
        if seq is None or (confirmed and seq < 0):
            return None
        return wb.seq - abs(seq)

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

    def match_groups(self, hashes: Sequence[int]) -> list[tuple[int, int]]:
        """Longest-prefix matches across all workers as `(depth, holders mask)` groups, deepest first.

        Every worker in a group holds at least `depth` leading blocks; a worker's match is the depth of the
        first (deepest) group it appears in (see `members`). Holders only shrink along a chain, so the depths
        where they change are found by bisection: O(groups x log(blocks)) lookups, whatever the fleet size.
        """
        if not hashes:
            return []
        get = self._holders.get
        first = get(hashes[0], 0)
        if not first:
            return []
        # the deepest block anyone holds
        lo, hi = 0, len(hashes) - 1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if get(hashes[mid]):
                lo = mid
            else:
                hi = mid - 1
        last = get(hashes[lo], 0)
        groups: list[tuple[int, int]] = []
        # intervals [i, j] of block indexes whose ends' holders differ, left (shallow) ones first
        stack = [(0, first, lo, last)]
        while stack:
            i, si, j, sj = stack.pop()
            if si == sj:
                continue
            if j == i + 1:
                groups.append((i + 1, si))
                continue
            mid = (i + j) >> 1
            sm = get(hashes[mid], 0)
            stack.append((mid, sm, j, sj))
            stack.append((i, si, mid, sm))
        groups.append((lo + 1, last))
        groups.reverse()
        return groups

    def match_all(self, hashes: Sequence[int], worker_ids: Iterable[str] | None = None) -> dict[str, int]:
        """Longest matched prefix, in blocks, of each worker holding any (only `worker_ids` when given)."""
        only = None if worker_ids is None else set(worker_ids)
        result: dict[str, int] = {}
        seen = 0
        for depth, mask in self.match_groups(hashes):
            for w in self.members(mask & ~seen):
                if only is None or w in only:
                    result[w] = depth
            seen |= mask
        return result

    # --- writes ---
    def insert(self, worker_id: str, hashes: Sequence[int], start: int = 0, confirmed: bool = True) -> None:
        """Record that the worker holds `hashes` (from block `start` on: the caller knows it holds the rest).

        `confirmed=False` lists them optimistically (routed there, not yet computed); a later confirmed
        insert (the response came back) confirms them, and an optimistic one never unconfirms a block.
        """
        if start >= len(hashes):
            return
        wb = self._workers.get(worker_id) or self._add_worker(worker_id)
        lru = wb.lru
        get = lru.get
        move = lru.move_to_end
        holders = self._holders
        hold = holders.get
        bit = 1 << wb.bit
        seq = wb.seq
        # deepest first, so that the head of a prompt is the most recent and LRU evicts tails first, as a
        # radix-tree prefix cache does; evicting heads first would break every chain that shares them
        for i in range(len(hashes) - 1, start - 1, -1):
            h = hashes[i]
            seq += 1
            old = get(h)
            if old is not None:
                move(h)
                lru[h] = seq if confirmed or old > 0 else -seq
            else:
                lru[h] = seq if confirmed else -seq
                holders[h] = hold(h, 0) | bit
        wb.seq = seq
        if len(lru) > wb.capacity:
            self._trim(wb, wb.capacity)

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
                self._unhold(h, ~(1 << wb.bit))
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
        are dropped. And when `predicted_age` (the age of the deepest predicted block at routing time, if it
        was confirmed then) is given, the worker's capacity shrinks towards that block's age *now*: the
        worker evicted it before this request reached the engine, so within that many touches (counting the
        time it queued in between; if the block was touched since, nothing is learned). At most by half
        per report, so one odd report cannot wipe the entry. If the worker had more than predicted, the
        index under-estimated it and the capacity grows. Returns the number of blocks the index over-claimed
        (0 when the report agrees or exceeds it).
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
        age = None if predicted_age is None or predicted == 0 else self.age(worker_id, hashes[predicted - 1])
        self.remove(worker_id, hashes[reported:predicted])
        if age is not None and predicted_age is not None and age >= predicted_age:
            wb.capacity = max(self.min_blocks, wb.capacity // 2, min(wb.capacity, age))
            if len(wb.lru) > wb.capacity:
                self._trim(wb, wb.capacity)
        return over

    def forget(self, worker_id: str) -> None:
        """Drop everything listed for a worker."""
        wb = self._workers.pop(worker_id, None)
        if wb is None:
            return
        keep = ~(1 << wb.bit)
        for h in wb.lru:
            self._unhold(h, keep)
        self._ids[wb.bit] = ""
        self._free.append(wb.bit)
        self._free.sort(reverse=True)

    # --- internals ---
    def _add_worker(self, worker_id: str) -> _Blocks:
        if self._free:
            bit = self._free.pop()
            self._ids[bit] = worker_id
        else:
            bit = len(self._ids)
            self._ids.append(worker_id)
        wb = self._workers[worker_id] = _Blocks(bit, self.max_blocks)
        return wb

    def _trim(self, wb: _Blocks, keep: int) -> None:
        lru = wb.lru
        mask = ~(1 << wb.bit)
        while len(lru) > keep:
            h, _ = lru.popitem(last=False)
            self._unhold(h, mask)

    def _unhold(self, h: int, keep: int) -> None:
        m = self._holders.get(h, 0) & keep
        if m:
            self._holders[h] = m
        else:
            self._holders.pop(h, None)
