"""Fixtures shared by every test module: the real redis-server fixture (tests/redis_server.py)."""

pytest_plugins = ("tests.redis_server",)
