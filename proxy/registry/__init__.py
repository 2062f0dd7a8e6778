"""Registry backends: memory (default) and Redis (shared by replicas)."""

from __future__ import annotations

import os
import socket

from .base import LoadReport, Registry, RegistryUnavailable, WorkerRecord
from .memory import MemoryRegistry

__all__ = ["LoadReport", "MemoryRegistry", "Registry", "RegistryUnavailable", "WorkerRecord", "open_registry"]


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def open_registry(
    url: str | None, *, prefix: str = "turbofleet", pin_ttl: float = 1800.0, replica_id: str | None = None
) -> Registry:
    """`None`/"memory" -> MemoryRegistry; "redis://..." -> RedisRegistry (imported only then)."""
    if not url or url == "memory":
        return MemoryRegistry(pin_ttl=pin_ttl)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisRegistry

        return RedisRegistry(url, prefix=prefix, pin_ttl=pin_ttl, replica_id=replica_id or default_replica_id())
    raise ValueError(f"unknown registry {url!r}: use memory or redis://HOST:PORT/DB")
