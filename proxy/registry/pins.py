"""One replica's side of the shared session pins: a local cache, the writes not yet sent and the lookups not
yet asked. No Redis calls here: the Redis registry sends the writes and asks the lookups in batches, so that a
busy replica pays one round trip for many requests, not one per request.

Freshness: a pin this replica sets or reads is trusted for PIN_REVALIDATE seconds (at most the pin TTL), then
read again; a re-pin
(a session moved to another worker) is published on the change feed and reaches every replica at once; a
"no pin" answer is trusted PIN_MISS_TTL seconds. New pins are not published: no other replica holds an entry
for a session it never saw, except a brief "no pin", and publishing every new session would cost each replica
one message per request of the whole fleet.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from . import keys as K
from .mirror import PinCache


class Pins:
    """Cache, pending writes and pending lookups of session pins."""

    def __init__(self, pin_ttl: float, capacity: int = K.LOCAL_PINS) -> None:
        self.cache = PinCache(capacity)
        #: how long a known pin is used without asking Redis (never past the pin's own TTL)
        self._trust = min(pin_ttl, K.PIN_REVALIDATE)
        #: a pin's TTL is slid at most this often (not on every release: a TTL of minutes needs no
        #: millisecond precision, and each slide is a Redis command)
        self._slide_every = min(pin_ttl * K.PIN_SLIDE_SHARE, K.PIN_SLIDE_MAX)
        self._slid: OrderedDict[str, float] = OrderedDict()
        #: session -> (worker url, publish as a re-pin)
        self.sets: dict[str, tuple[str, bool]] = {}
        #: sessions whose pin TTL a release slides
        self.touches: set[str] = set()
        #: session -> the futures of the requests waiting for its lookup (one each: cancelling one request
        #: must not cancel the others' wait)
        self._lookups: dict[str, list[asyncio.Future[str | None]]] = {}
        self._capacity = capacity

    # --- the request path ---
    def cached(self, key: str, t: float) -> tuple[bool, str | None]:
        return self.cache.lookup(key, t)

    def last_known(self, key: str) -> str | None:
        """The cached pin even if due for revalidation (what to route on while Redis is away)."""
        return self.cache.peek(key)

    def pinned(self, key: str, url: str, t: float) -> None:
        prev = self.cache.peek(key)
        if prev == url and self.cache.lookup(key, t)[0]:
            return  # pinned there already and recently confirmed: the release slides the TTL
        self.cache.put(key, url, t + self._trust)
        queued = self.sets.get(key)
        if queued is None and len(self.sets) >= self._capacity:
            return  # Redis has been away long: the local cache still routes this session
        repin = (prev is not None and prev != url) or (queued is not None and queued[1])
        self.sets[key] = (url, repin)
        self._slide_noted(key, t)

    def touched(self, key: str, t: float) -> None:
        if t - self._slid.get(key, -1e18) < self._slide_every or len(self.touches) >= self._capacity:
            return
        self.touches.add(key)
        self._slide_noted(key, t)

    def _slide_noted(self, key: str, t: float) -> None:
        self._slid[key] = t
        self._slid.move_to_end(key)
        while len(self._slid) > self._capacity:
            self._slid.popitem(last=False)

    def ask(self, key: str) -> asyncio.Future[str | None]:
        """A future for the pin in Redis; requests for one session share one lookup."""
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._lookups.setdefault(key, []).append(fut)
        return fut

    # --- the background side ---
    def take_writes(self) -> tuple[dict[str, tuple[str, bool]], set[str]]:
        sets, self.sets = self.sets, {}
        touches, self.touches = self.touches, set()
        return sets, touches

    def restore_writes(self, sets: dict[str, tuple[str, bool]], touches: set[str]) -> None:
        """Put back writes that could not be sent; newer ones queued meanwhile win."""
        for key, val in sets.items():
            self.sets.setdefault(key, val)
        self.touches |= touches

    def take_lookups(self) -> dict[str, list[asyncio.Future[str | None]]]:
        lookups, self._lookups = self._lookups, {}
        return lookups

    def answer(self, key: str, url: str | None, t: float, futs: list[asyncio.Future[str | None]]) -> None:
        """Redis answered a lookup: cache it (unless this replica pinned the session meanwhile) and wake the
        requests waiting on it."""
        hit, newer = self.cache.lookup(key, t)
        if hit and newer is not None:
            url = newer
        elif url is None:
            self.cache.put(key, None, t + K.PIN_MISS_TTL)
        else:
            self.cache.put(key, url, t + self._trust)
        for fut in futs:
            if not fut.done():
                fut.set_result(url)

    def fail_lookups(self, lookups: dict[str, list[asyncio.Future[str | None]]]) -> None:
        """Redis did not answer: route on what is known (fail open)."""
        for key, futs in lookups.items():
            for fut in futs:
                if not fut.done():
                    fut.set_result(self.cache.peek(key))

    def heard(self, key: str, url: str, t: float) -> None:
        """A re-pin published by another replica."""
        self.cache.put(key, url, t + self._trust)

    def pending(self) -> int:
        return len(self.sets) + len(self.touches)
