"""The sim's app factory served in-process (aiohttp's test server), for tests/test_sim_*.py; no tests here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from turbofleet.worker.sim.config import EngineConfig, SimConfig
from turbofleet.worker.sim.server import build_app

MODEL = "sim-inproc"


@asynccontextmanager
async def serve(**kw: object) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The sim app for MODEL on aiohttp's test server; `kw` are SimConfig fields (a fast engine by default)."""
    kw.setdefault("engine", EngineConfig(decode_ms_base=1.0, decode_ms_per_seq=0.0))
    cfg = SimConfig(model=MODEL, **kw)  # type: ignore[arg-type]  # SimConfig's fields are typed one by one
    async with TestClient(TestServer(build_app(cfg))) as client:
        yield client
