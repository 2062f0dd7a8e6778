"""Moved to tests/redis_kit.py; this name stays for test modules written before the move. Import `tests.redis_kit`."""

from tests.redis_kit import (
    SEARCH,
    RedisServer,
    eventually,
    needs_redis,
    ping,
    redis_binary,
)

__all__ = [
    "SEARCH",
    "RedisServer",
    "eventually",
    "needs_redis",
    "ping",
    "redis_binary",
]
