"""What an open stream holds in the proxy (issue 16: memory per open stream), in process (tests/inproc_kit.py).

A stream lives for minutes, so every object its await chain keeps alive counts once per open stream. These
pin what the relay cut from that chain: no frame of the edge middleware, of `_exchange` (the try's headers, the
first-byte handling) or of a retry loop apart from `forward`, no request body, parsed or not; and that
the try's deadline and upstream response, handed from `_exchange` to the relay, are still ended on every path.
"""

from __future__ import annotations

import asyncio
import json
from types import CoroutineType
from typing import Any

from aiohttp.test_utils import TestClient

from tests.inproc_kit import MIDWAY_HANG, MODEL, fake_workers, proxy_client, sse_events
from turbofleet.proxy.keys import POOL, RELAY

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True}


def _chain(coro: Any) -> list[Any]:
    """The coroutines a task's coroutine is awaiting, outermost first."""
    out = []
    while isinstance(coro, CoroutineType):
        out.append(coro)
        coro = coro.cr_await
    return out


def _relaying() -> list[Any]:
    """The await chain of the one task relaying a stream."""
    chains = [_chain(t.get_coro()) for t in asyncio.all_tasks()]
    found = [c for c in chains if any(x.cr_code.co_name == "_relay_stream" for x in c)]
    assert len(found) == 1, [[x.cr_code.co_name for x in c] for c in chains]
    return found[0]


async def _open_stream(client: TestClient[Any, Any]) -> tuple[Any, bytes]:
    """A stream whose worker sent two events and went quiet; the client has read the first bytes."""
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 200
    return resp, await resp.content.readany()


async def test_an_open_stream_holds_no_edge_or_exchange_frame_and_no_parsed_body() -> None:
    async with fake_workers(1) as [w], proxy_client([w], idle_timeout=30.0) as client:
        w.behave(MIDWAY_HANG)
        resp, first = await _open_stream(client)
        assert first.startswith(b"data: ")
        names = [c.cr_code.co_name for c in _relaying()]
        assert "_relay_stream" in names and "_try" in names and "handler" in names
        assert "edge_middleware" not in names and "_exchange" not in names, names
        # the relay's part of the chain: the request (admission, tries, accounting), the try, the relay loop,
        # which awaits the upstream's waiter itself
        assert names[names.index("handler") + 1:] == ["forward", "_try", "_relay_stream"], names
        handler = next(c for c in _relaying() if c.cr_code.co_name == "handler")
        assert "data" not in handler.cr_frame.f_locals  # the parsed JSON is gone
        assert handler.cr_frame.f_locals["body"].data == b""  # and the request's bytes: no try will follow
        assert len(client.app[RELAY]._live) == 1  # the try's deadline is live while the stream is relayed
        resp.close()  # the client leaves mid-stream
        await asyncio.wait_for(w.closed.wait(), 10)  # the upstream connection was closed: generation stops
        relay = client.app[RELAY]
        deadline = asyncio.get_running_loop().time() + 10.0
        while relay.active or relay._live:
            assert asyncio.get_running_loop().time() < deadline, "the try's deadline was never ended"
            await asyncio.sleep(0.01)


async def test_a_finished_stream_gives_its_connection_back_and_ends_its_deadline() -> None:
    async with fake_workers(1) as [w], proxy_client([w]) as client:
        for _ in range(2):
            async with client.post("/v1/chat/completions", json=CHAT) as r:
                assert sse_events(await r.text())[-1] == "[DONE]"
        relay, pool = client.app[RELAY], client.app[POOL]
        assert not relay._live and relay.active == 0
        assert len(pool._all) == 1  # one connection, reused by the second stream: the first gave it back
        assert sum(len(idle) for idle in pool._idle.values()) == 1


async def test_shutdown_still_ends_a_stream_being_relayed() -> None:
    async with fake_workers(1) as [w], proxy_client([w], idle_timeout=30.0) as client:
        w.behave(MIDWAY_HANG)
        resp, first = await _open_stream(client)
        assert client.app[RELAY].abort_all() == 1
        events = sse_events((first + await asyncio.wait_for(resp.content.read(), 10)).decode())
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down"
        await asyncio.wait_for(w.closed.wait(), 10)
        resp.close()

