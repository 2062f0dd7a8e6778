"""The proxy's listening socket (issue 16): the accept queue it asks the kernel for, and what it logs about it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.procs_kit import running, start_proxy, wait_until
from turbofleet.proxy.serve import LISTEN_BACKLOG, accept_queue


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
