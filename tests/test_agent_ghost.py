"""Issue 18, the ghost re-registration: a heartbeat that races with the agent's own removal gets a 404, and the
agent must not register again; the proxy refuses such a late rejoin for a short tombstone.

The agent side runs the real `Agent` against a small node-API double on 127.0.0.1 that forces the race: one
heartbeat is held until the removal arrives and then answered 404, and the removal is answered only after a
registration came or 2 s passed. Today's agent answers that 404 by registering again while the removal is
pending; the fixed one never registers once it has begun to deregister. The proxy side uses the real app.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.agent_kit import agent_in_process, stop_in_process
from turbofleet.proxy.app import build_app
from turbofleet.proxy.config import Settings
from turbofleet.proxy.tombstones import Tombstones

URL = "http://10.255.0.9:23333"  # the advertised URL is only a name here: nothing dials it


def _answer(make: Any, *args: Any, **kwargs: Any) -> Any:
    async def handler(_: web.Request) -> web.StreamResponse:
        return make(*args, **kwargs)  # type: ignore[no-any-return]

    return handler


class NodeDouble:
    """The proxy's node API and the worker's probe routes in one tiny app, recording the order of calls."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.registered = asyncio.Event()
        self.hold_next_heartbeat = False
        self.removal_seen = asyncio.Event()
        self.added_after_removal = asyncio.Event()
        self.app = web.Application()
        r = self.app.router
        r.add_get("/health", _answer(web.Response, text="ok"))
        r.add_get("/v1/models", _answer(web.json_response, {"data": [{"id": "m"}]}))
        r.add_get("/metrics", _answer(web.Response, text=""))
        r.add_get("/nodes/status", _answer(web.json_response, {URL: {"unfinished": 0}}))
        r.add_post("/nodes/add", self.add)
        r.add_post("/nodes/heartbeat", self.heartbeat)
        r.add_post("/nodes/drain", self.drain)
        r.add_post("/nodes/remove", self.remove)

    async def add(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.events.append(("add", body))
        if self.removal_seen.is_set():
            self.added_after_removal.set()
        self.registered.set()
        return web.json_response("Added successfully")

    async def heartbeat(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.hold_next_heartbeat:
            self.hold_next_heartbeat = False
            self.events.append(("heartbeat held", body))
            await self.removal_seen.wait()
            return web.json_response({"error": {"code": "worker_not_found"}}, status=404)
        return web.json_response({"ok": True})

    async def drain(self, request: web.Request) -> web.Response:
        self.events.append(("drain", await request.json()))
        return web.json_response({"state": "draining"})

    async def remove(self, request: web.Request) -> web.Response:
        self.events.append(("remove", await request.json()))
        self.removal_seen.set()
        # give a ghost registration the time to arrive while the removal is still pending
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.added_after_removal.wait(), 2.0)
        return web.json_response("Deleted successfully")


async def test_agent_never_registers_again_once_it_deregisters() -> None:
    double = NodeDouble()
    async with agent_in_process(double.app, advertise_url=URL, heartbeat_interval=0.05, drain_grace=5.0) as (
            agent, run):
        await asyncio.wait_for(double.registered.wait(), 10)
        double.hold_next_heartbeat = True
        # wait until the held heartbeat is in flight, then ask the agent to stop
        deadline = time.monotonic() + 10
        while not any(kind == "heartbeat held" for kind, _ in double.events):
            assert time.monotonic() < deadline, "no heartbeat was held"
            await asyncio.sleep(0.01)
        assert await stop_in_process(agent, run) == 0
    kinds = [kind for kind, _ in double.events]
    assert "remove" in kinds, kinds
    after = kinds[kinds.index("remove") + 1:]
    assert "add" not in after, f"the agent registered again after deregistering: {kinds}"
    assert not double.added_after_removal.is_set()
    removal = next(body for kind, body in double.events if kind == "remove")
    assert removal["agent_id"] == agent.agent_id, "the removal names the agent, for the proxy's tombstone"


# ------------------------------------------------------------------ proxy side


async def _proxy(ttl: float = 15.0) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(build_app(Settings(heartbeat_ttl=ttl)), host="127.0.0.1"))
    await client.start_server()
    return client


def _add(agent_id: str | None, rejoin: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"url": URL, "status": {"models": ["m"], "role": 1}, "heartbeat_ttl": 15.0,
                            "source": "agent", "state": "draining"}
    if agent_id:
        body["agent_id"] = agent_id
    if rejoin:
        body["rejoin"] = True
    return body


async def _listed(client: TestClient[Any, Any]) -> bool:
    r = await client.get("/nodes/status")
    return URL in await r.json()


async def test_proxy_ignores_the_removed_agents_late_rejoin() -> None:
    client = await _proxy()
    try:
        assert (await client.post("/nodes/add", json=_add("agent-1"))).status == 200
        assert (await client.post("/nodes/remove", json={"url": URL, "agent_id": "agent-1"})).status == 200
        # the heartbeat that raced with the removal: 404, and the old agent answers it by registering again
        assert (await client.post("/nodes/heartbeat", json={"url": URL, "load": {}})).status == 404
        ghost = await client.post("/nodes/add", json=_add("agent-1", rejoin=True))
        assert ghost.status == 409
        assert (await ghost.json())["error"]["code"] == "worker_removed"
        assert not await _listed(client), "the ghost is not listed"
        # an anonymous rejoin (an agent that sends no id) is refused too
        assert (await client.post("/nodes/add", json=_add(None, rejoin=True))).status == 409
        assert not await _listed(client)
        # a new agent process on the same address is taken at once
        assert (await client.post("/nodes/add", json=_add("agent-2"))).status == 200
        assert await _listed(client)
    finally:
        await client.close()


async def test_operator_removal_leaves_no_tombstone() -> None:
    """`/nodes/remove` without an agent id (an operator, LMDeploy's tools): the live agent may come back."""
    client = await _proxy()
    try:
        assert (await client.post("/nodes/add", json=_add("agent-1"))).status == 200
        assert (await client.post("/nodes/remove", json={"url": URL})).status == 200
        assert (await client.post("/nodes/add", json=_add("agent-1", rejoin=True))).status == 200
        assert await _listed(client)
    finally:
        await client.close()


def test_tombstone_expires_and_a_plain_registration_clears_it() -> None:
    t = Tombstones(ttl=5.0)
    t.bury(URL, "a", now=100.0)
    assert t.refuses(URL, "a", rejoin=False, now=101.0)
    assert t.refuses(URL, None, rejoin=True, now=101.0)
    assert not t.refuses(URL, "a", rejoin=True, now=105.0), "gone after the ttl"
    assert not t.buried(URL, now=105.0)
    t.bury(URL, "a", now=200.0)
    assert not t.refuses(URL, None, rejoin=False, now=201.0), "LMDeploy's own registration is taken"
    assert not t.refuses(URL, "a", rejoin=True, now=201.0), "and it cleared the tombstone"
