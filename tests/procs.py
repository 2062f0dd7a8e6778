"""Moved to tests/procs_kit.py; this name stays for test modules written before the move. Import `tests.procs_kit`."""

from tests.procs_kit import (
    ROOT,
    Proc,
    close_openai_clients,
    free_port,
    http_json,
    http_raw,
    openai_client,
    running,
    spawn,
    start_proxy,
    start_sim,
    wait_http,
    wait_until,
)

__all__ = [
    "ROOT",
    "Proc",
    "close_openai_clients",
    "free_port",
    "http_json",
    "http_raw",
    "openai_client",
    "running",
    "spawn",
    "start_proxy",
    "start_sim",
    "wait_http",
    "wait_until",
]
