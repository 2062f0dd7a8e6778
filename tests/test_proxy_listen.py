"""The proxy's listening socket and its garbage collection (issue 16): the accept queue it asks the kernel for,
what it logs about it, and full collections on a timer."""

from __future__ import annotations

import asyncio
import gc
import shutil
import subprocess
import weakref
from pathlib import Path

import pytest

from tests.procs_kit import running, start_proxy, wait_until
from turbofleet.proxy.serve import LISTEN_BACKLOG, FullCollector, accept_queue


def test_accept_queue_is_the_backlog_capped_by_somaxconn(tmp_path: Path) -> None:
    f = tmp_path / "somaxconn"
    f.write_text("4096\n")
    assert accept_queue(65535, str(f)) == (4096, 4096)
    f.write_text("100000\n")
    assert accept_queue(65535, str(f)) == (65535, 100000)
    assert accept_queue(65535, str(tmp_path / "missing")) == (65535, None)


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_listener_gets_the_large_backlog(tmp_path: Path) -> None:
    """The kernel shows a listener's accept-queue limit as ss's Send-Q: it must be the backlog the proxy asks
    for (capped by somaxconn), not aiohttp's default of 128."""
    want, cap = accept_queue()
    if cap is None:
        pytest.skip("net.core.somaxconn unreadable")
    if want <= 128:
        pytest.skip("somaxconn is at aiohttp's default or below: the two cannot be told apart here")
    with running(start_proxy(tmp_path)) as (proxy,):
        line = subprocess.run(["ss", "-ltnH", f"sport = :{proxy.port}"], capture_output=True, text=True,
                              check=True).stdout.split()
        assert line[0] == "LISTEN"
        assert int(line[2]) == min(LISTEN_BACKLOG, cap)
        wait_until(lambda: f"accept queue {want} connections" in proxy.log.read_text(), timeout=10)


async def test_full_collections_run_on_the_timer_not_on_growth() -> None:
    """The oldest generation leaves Python's schedule (its threshold is out of reach), the startup objects are
    frozen, and the timer collects cyclic garbage; stop() gives Python its schedule back."""
    before = gc.get_threshold()
    collector = FullCollector(interval=0.05)
    collector.start()
    try:
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 10**9
        assert gc.get_freeze_count() > 0
        # cyclic garbage in the oldest generation: only a full collection frees it, and only the timer runs one
        gone = asyncio.Event()

        class Cycle:
            def __init__(self) -> None:
                self.me = self

        c = Cycle()
        weakref.finalize(c, gone.set)
        gc.collect(1)  # the young generations' survivors move to the oldest
        del c
        await asyncio.wait_for(gone.wait(), 5)
        assert collector.runs >= 1
    finally:
        collector.stop()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
