"""Sim engines started in-process for a test and stopped after it (the sim engine and GPU-share tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from turbofleet.worker.sim.cache import PrefixCache
from turbofleet.worker.sim.config import EngineConfig
from turbofleet.worker.sim.engine import Engine
from turbofleet.worker.sim.stats import SimStats


@asynccontextmanager
async def running_engines() -> AsyncIterator[Callable[[EngineConfig], Engine]]:
    """A maker of started engines, each with its own cache and stats; every one is stopped on the way out."""
    engines: list[Engine] = []

    def make(cfg: EngineConfig) -> Engine:
        e = Engine(cfg, PrefixCache(cfg.block_size, cfg.cache_blocks, cfg.prefix_cache), SimStats())
        e.start()
        engines.append(e)
        return e

    try:
        yield make
    finally:
        for e in engines:
            await e.stop()
