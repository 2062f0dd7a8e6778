"""Issue 18: a heartbeat lost in a brief network fault must not hold the worker's lease past its TTL.

A black-holed link drops the packets of the heartbeat in flight; when the link comes back TCP resends them only
after its back-off, and the agent skips that proxy while the beat is in flight. With the node client's 5 s
timeout and a 3 s TTL the lease ran out although the fault lasted ~1.5 s, and the proxy dropped a healthy
worker (seen on the network test bed: tests/test_netbed_faults.py::test_proxy_cut_off_from_redis, "re-pin:
pinned worker gone"). The real `Agent` runs here against a node-API double that never answers one heartbeat.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from tests.agent_kit import agent_in_process, stop_in_process
from turbofleet.worker.agent import HEARTBEAT_TIMEOUT_MAX, heartbeat_timeout

URL = "http://10.255.0.9:23333"  # only a name: nothing dials it


class HoldingProxy:
    """Node API and probe routes; the heartbeat after `hold` is set never answers (a silent link)."""

    def __init__(self) -> None:
        self.hold = False
        self.held_at: float | None = None
        self.answered: list[float] = []
        self.registered = asyncio.Event()
        self.app = web.Application()
        r = self.app.router
        r.add_get("/health", self.ok)
        r.add_get("/v1/models", self.models)
        r.add_get("/metrics", self.ok)
        r.add_post("/nodes/add", self.add)
        r.add_post("/nodes/heartbeat", self.heartbeat)
        r.add_get("/nodes/status", self.status)
        r.add_post("/nodes/drain", self.ok)
        r.add_post("/nodes/remove", self.ok)

    async def ok(self, _: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    async def status(self, _: web.Request) -> web.Response:
        return web.json_response({URL: {"unfinished": 0}})

    async def add(self, _: web.Request) -> web.Response:
        self.registered.set()
        return web.json_response("Added successfully")

    async def heartbeat(self, _: web.Request) -> web.Response:
        if self.hold:
            self.hold = False
            self.held_at = time.monotonic()
            await asyncio.sleep(3600)  # the beat that was lost on the wire
        self.answered.append(time.monotonic())
        return web.json_response({"ok": True})


@pytest.mark.parametrize(("interval", "ttl", "expected"), [
    (2.0, 10.0, 4.0),  # the defaults
    (0.5, 3.0, 1.25),  # the test bed's
    (1.0, 60.0, HEARTBEAT_TIMEOUT_MAX),  # a long TTL: the node client's own limit
    (1.0, 1.0, 0.2),  # a TTL no longer than the interval: still a short, positive wait
])
def test_heartbeat_timeout_fits_the_ttl(interval: float, ttl: float, expected: float) -> None:
    assert heartbeat_timeout(interval, ttl) == pytest.approx(expected)


async def test_a_lost_heartbeat_is_given_up_before_the_lease_runs_out() -> None:
    double = HoldingProxy()
    interval, ttl = 0.1, 1.0
    async with agent_in_process(double.app, advertise_url=URL, heartbeat_interval=interval, heartbeat_ttl=ttl,
                                drain_grace=1.0) as (agent, run):
        await asyncio.wait_for(double.registered.wait(), 10)
        deadline = time.monotonic() + 5
        while not double.answered:
            assert time.monotonic() < deadline, "no heartbeat arrived"
            await asyncio.sleep(0.01)
        last_before = double.answered[-1]
        double.hold = True
        while double.held_at is None:
            assert time.monotonic() < deadline, "no heartbeat was held"
            await asyncio.sleep(0.01)
        # the next answered beat lands within the TTL of the last one before the loss
        while not any(t > double.held_at for t in double.answered):
            assert time.monotonic() - last_before < ttl + 1.0, "no heartbeat after the lost one"
            await asyncio.sleep(0.01)
        after = next(t for t in double.answered if t > double.held_at)
        assert after - last_before < ttl, f"the lease would have lapsed: {after - last_before:.2f}s between beats"
        assert await stop_in_process(agent, run) == 0
