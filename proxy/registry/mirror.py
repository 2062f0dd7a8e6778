"""A replica's local mirror of the shared registry: plain data and arithmetic, no I/O, no clock reads.

The Redis backend feeds it (change-feed messages, periodic reads) and routes from it. Every fleet write in
Redis carries a version; the mirror applies a write only when it is newer than what it holds for that worker,
so feed messages, full re-reads and our own write replies can arrive in any order and still converge.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from turbofleet.balancer.policy import WorkerView

from .base import Listeners, WorkerChange, WorkerRecord, to_view
from .keys import SESSIONS_FIELD, TENANTS_FIELD

#: fields Redis stamps itself (scripts.UPSERT) rather than taking from the caller
STAMPED = ("registered_at", "last_heartbeat")


def encode_fields(values: Mapping[str, Any]) -> list[str]:
    """Hash field/value pairs for Redis: each value JSON-encoded, flattened as HSET wants them."""
    out: list[str] = []
    for k, v in values.items():
        out += [k, json.dumps(v, separators=(",", ":"))]
    return out


def record_fields(record: WorkerRecord) -> list[str]:
    """A record as upsert pairs (without the fields Redis stamps)."""
    return encode_fields({k: v for k, v in record.to_dict().items() if k not in STAMPED})


def pairs(flat: Sequence[Any]) -> dict[str, str]:
    """A flat [k1, v1, k2, v2, ...] reply (HGETALL inside Lua) as a dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def decode_record(fields: Mapping[str, str]) -> tuple[WorkerRecord, int]:
    """A stored worker hash -> (record, version)."""
    values = {k: json.loads(v) for k, v in fields.items() if k != "v"}
    return WorkerRecord.from_dict(values), int(fields.get("v", 0))


@dataclass(frozen=True, slots=True)
class Change:
    """One change-feed message: a worker written (put), removed (del), or a session pinned (pin)."""

    op: str
    url: str
    version: int = 0
    record: WorkerRecord | None = None
    session_key: str = ""


def parse_message(data: str) -> Change | None:
    """Decode a feed message; None for anything malformed (a bad message must not stop the feed)."""
    try:
        msg = json.loads(data)
        op = str(msg["op"])
        if op == "put":
            rec, _ = decode_record(pairs(msg["f"]))
            return Change(op, str(msg["url"]), int(msg["v"]), rec)
        if op == "del":
            return Change(op, str(msg["url"]), int(msg["v"]))
        if op == "pin":
            return Change(op, str(msg["url"]), session_key=str(msg["k"]))
    except (ValueError, KeyError, TypeError):
        return None
    return None


def pin_message(session_key: str, url: str) -> str:
    return json.dumps({"op": "pin", "k": session_key, "url": url}, separators=(",", ":"))


class Mirror:
    """Workers and in-flight counts as this replica knows them."""

    def __init__(self) -> None:
        self.records: dict[str, WorkerRecord] = {}
        #: url -> version of the last write applied for it; removed workers stay as tombstones
        self.versions: dict[str, int] = {}
        #: Redis data set the versions belong to, and the version of the last full read
        self.epoch = ""
        self.base = 0
        #: highest fleet version applied (feed, own writes, full reads); compared with Redis' to find gaps
        self.seen = 0
        #: this replica's exact in-flight counts, and the last known sum over the other live replicas
        self.local: dict[str, int] = {}
        self.others: dict[str, int] = {}
        #: active sessions per worker placed by the other live replicas (issue 18)
        self.others_sessions: dict[str, int] = {}
        self._views: tuple[WorkerView, ...] | None = None
        self._views_at = 0.0
        #: told of every worker added, changed or removed as writes apply (whoever made them)
        self.listeners = Listeners()

    # --- fleet ---
    def _newer(self, url: str, version: int) -> bool:
        return version > self.base and version > self.versions.get(url, 0)

    def put(self, record: WorkerRecord, version: int) -> bool:
        """Apply a worker write; False when something newer is already applied."""
        self.seen = max(self.seen, version)
        if not self._newer(record.url, version):
            return False
        old = self.records.get(record.url)
        self.records[record.url] = record
        self.versions[record.url] = version
        self._views = None
        self.listeners.emit(WorkerChange.ADDED if old is None else WorkerChange.CHANGED, record.url, record)
        return True

    def delete(self, url: str, version: int) -> bool:
        self.seen = max(self.seen, version)
        if not self._newer(url, version):
            return False
        found = self.records.pop(url, None) is not None
        self.versions[url] = version
        self._views = None
        if found:
            self.listeners.emit(WorkerChange.REMOVED, url)
        return True

    def load(self, epoch: str, version: int, records: Iterable[tuple[WorkerRecord, int]]) -> None:
        """Take a full read made at `version`; keep what the feed already applied past it."""
        fresh = {rec.url: (rec, v) for rec, v in records}
        before = self.records
        if epoch != self.epoch:
            # Redis lost its data (or this is the first read): versions restarted, nothing old compares
            self.records, self.versions, self.seen = {}, {}, 0
            self.epoch = epoch
        newer = {u: v for u, v in self.versions.items() if v > version}
        records_now: dict[str, WorkerRecord] = {}
        versions_now: dict[str, int] = {}
        for url, (rec, v) in fresh.items():
            if url not in newer:
                records_now[url], versions_now[url] = rec, v
        for url, v in newer.items():
            versions_now[url] = v
            if url in self.records:
                records_now[url] = self.records[url]
        self.records, self.versions = records_now, versions_now
        self.base = version
        self.seen = max(self.seen, version)
        self._views = None
        # what the read changed, told as the feed would have: it may have missed removals and additions
        for url in before.keys() - records_now.keys():
            self.listeners.emit(WorkerChange.REMOVED, url)
        for url, rec in records_now.items():
            old = before.get(url)
            if old is None:
                self.listeners.emit(WorkerChange.ADDED, url, rec)
            elif old != rec:
                self.listeners.emit(WorkerChange.CHANGED, url, rec)

    # --- in-flight ---
    def acquire(self, url: str) -> int:
        n = self.local.get(url, 0) + 1
        self.local[url] = n
        self._views = None
        return n

    def release(self, url: str) -> int:
        n = self.local.get(url, 0) - 1
        if n > 0:
            self.local[url] = n
        else:
            n = 0
            self.local.pop(url, None)
        self._views = None
        return n

    def set_others(self, counts: dict[str, int], sessions: dict[str, int] | None = None) -> None:
        """Other replicas' in-flight counts and (issue 18) their active sessions per worker."""
        if counts != self.others:
            self.others = counts
            self._views = None
        if sessions is not None and sessions != self.others_sessions:
            self.others_sessions = sessions
            self._views = None

    def in_flight(self, url: str) -> int:
        return self.local.get(url, 0) + self.others.get(url, 0)

    # --- the routing view ---
    def snapshot(self, t: float) -> tuple[WorkerView, ...]:
        """Views at time `t` (Redis' clock); rebuilt on change and once a second, since liveness ages."""
        if self._views is None or t - self._views_at > 1.0:
            self._views = tuple(to_view(r, self.in_flight(u), t, self.others_sessions.get(u, 0))
                                for u, r in self.records.items())
            self._views_at = t
        return self._views


def sum_counts(hashes: Iterable[Mapping[str, str]], prefix: str = "") -> dict[str, int]:
    """Fleet-wide in-flight per worker from replicas' hashes (negative or garbled values count as 0).
    With `prefix`, only the fields named `prefix + url` are summed (session counts, keys.SESSIONS_FIELD);
    without, those fields are skipped."""
    total: dict[str, int] = {}
    for h in hashes:
        for field, raw in h.items():
            if prefix:
                if not field.startswith(prefix):
                    continue
                url = field[len(prefix):]
            elif field.startswith((SESSIONS_FIELD, TENANTS_FIELD)):
                continue
            else:
                url = field
            try:
                n = int(raw)
            except ValueError:
                continue
            if n > 0:
                total[url] = total.get(url, 0) + n
    return total


class PinCache:
    """Session pins this replica has seen, each with a local expiry (monotonic seconds); None = known absent."""

    def __init__(self, capacity: int) -> None:
        self._entries: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, t: float) -> tuple[bool, str | None]:
        """(hit, url): hit is False when unknown or expired, and the caller must ask Redis."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        url, expires = entry
        if t > expires:
            del self._entries[key]
            return False, None
        return True, url

    def put(self, key: str, url: str | None, expires: float) -> None:
        self._entries[key] = (url, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def peek(self, key: str) -> str | None:
        entry = self._entries.get(key)
        return entry[0] if entry else None

    def clear(self) -> None:
        self._entries.clear()
