"""The Redis backend's local mirror: pure ordering and counting rules (no Redis, no event loop)."""

from __future__ import annotations

from turbofleet.proxy.registry.base import WorkerRecord
from turbofleet.proxy.registry.mirror import (
    Mirror,
    PinCache,
    decode_record,
    pairs,
    parse_message,
    pin_message,
    record_fields,
    sum_counts,
)


def rec(url: str, state: str = "ready", running: int = 0) -> WorkerRecord:
    return WorkerRecord(url=url, models=("m",), state=state, running=running)


def test_fields_round_trip() -> None:
    r = WorkerRecord(
        url="http://w",
        models=("a", "b"),
        role=2,
        labels={"zone": "x"},
        capacity=8,
        gpu={"name": "H100", "mem": 80},
        heartbeat_ttl=15.0,
        running=3,
        kv_usage=0.5,
    )
    flat = record_fields(r)
    assert "registered_at" not in flat[::2] and "last_heartbeat" not in flat[::2]
    back, version = decode_record({**pairs(flat), "v": "7", "registered_at": "12.5", "last_heartbeat": "13"})
    assert back == r.with_(registered_at=12.5, last_heartbeat=13.0)
    assert version == 7


def test_newer_write_wins_whatever_the_arrival_order() -> None:
    m = Mirror()
    assert m.put(rec("u", running=2), 5)
    assert not m.put(rec("u", running=1), 4)  # a late, older message
    assert m.records["u"].running == 2
    assert m.delete("u", 6)
    assert not m.put(rec("u"), 5)  # must not resurrect a removed worker
    assert "u" not in m.records
    assert m.put(rec("u", running=9), 7)
    assert m.records["u"].running == 9 and m.seen == 7


def test_full_read_keeps_what_the_feed_applied_past_it() -> None:
    m = Mirror()
    m.load("e1", 10, [(rec("a"), 3), (rec("b"), 10)])
    assert set(m.records) == {"a", "b"}
    m.put(rec("c"), 12)  # feed, after the next read's cut
    m.delete("a", 13)
    m.load("e1", 11, [(rec("a"), 3), (rec("b", state="draining"), 11)])
    assert set(m.records) == {"b", "c"}
    assert m.records["b"].state == "draining"
    assert not m.put(rec("b"), 11)  # older than or equal to the read: ignored
    assert m.base == 11


def test_new_epoch_discards_old_versions() -> None:
    m = Mirror()
    m.load("e1", 500, [(rec("a"), 500)])
    m.load("e2", 1, [(rec("b"), 1)])  # Redis lost its data and was reseeded
    assert set(m.records) == {"b"}
    assert m.put(rec("c"), 2)


def test_counts_local_plus_others() -> None:
    m = Mirror()
    m.put(rec("u"), 1)
    m.acquire("u")
    m.acquire("u")
    m.set_others(sum_counts([{"u": "3"}, {"u": "-1", "v": "x"}, {"u": "2"}]))
    assert m.in_flight("u") == 7
    assert m.snapshot(0.0)[0].in_flight == 7
    m.release("u")
    m.release("u")
    m.release("u")  # one too many must not go negative
    assert m.local == {} and m.in_flight("u") == 5


def test_messages() -> None:
    assert parse_message("not json") is None
    assert parse_message('{"op":"put","url":"u","v":1,"f":["url"]}') is None
    pin = parse_message(pin_message("s1", "http://w"))
    assert pin is not None and (pin.op, pin.session_key, pin.url) == ("pin", "s1", "http://w")
    put = parse_message('{"op":"put","url":"u","v":3,"f":["url","\\"u\\"","models","[\\"m\\"]","v","3"]}')
    assert put is not None and put.record is not None and put.record.models == ("m",) and put.version == 3


def test_pin_cache_expiry_and_lru() -> None:
    c = PinCache(capacity=2)
    c.put("a", "w1", expires=10.0)
    c.put("b", None, expires=10.0)
    assert c.lookup("a", 5.0) == (True, "w1")
    assert c.lookup("b", 5.0) == (True, None)  # known absent
    assert c.lookup("a", 11.0) == (False, None)
    c.put("c", "w2", 10.0)
    c.put("d", "w3", 10.0)
    assert len(c) == 2 and c.peek("b") is None and c.peek("d") == "w3"


def test_the_mirror_tells_listeners_what_changed_however_it_heard() -> None:
    """Feed writes, deletes and full re-reads all raise the same worker events (the policy forgets on them)."""
    from turbofleet.proxy.registry.base import WorkerChange, WorkerEvent

    m = Mirror()
    seen: list[tuple[WorkerChange, str]] = []

    def listener(e: WorkerEvent) -> None:
        seen.append((e.change, e.url))

    m.listeners.subscribe(listener)
    m.load("e1", 1, [(rec("a"), 1), (rec("b"), 1)])
    assert seen == [(WorkerChange.ADDED, "a"), (WorkerChange.ADDED, "b")]
    seen.clear()
    m.put(rec("a", state="draining"), 2)
    m.put(rec("a"), 2)  # stale: not applied, no event
    m.delete("b", 3)
    m.delete("b", 4)  # already gone: no event
    assert seen == [(WorkerChange.CHANGED, "a"), (WorkerChange.REMOVED, "b")]
    seen.clear()
    # a full read that missed a removal and an addition (the feed dropped them) tells both
    m.load("e1", 10, [(rec("c"), 9)])
    assert sorted(seen) == [(WorkerChange.ADDED, "c"), (WorkerChange.REMOVED, "a")]
