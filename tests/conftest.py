"""Fixtures shared by every test module: the real redis-server fixture (tests/redis_server.py), and the
closing of every `openai` client a test made through `tests.procs.openai_client`."""

from collections.abc import Iterator

import pytest

from tests.procs import close_openai_clients

pytest_plugins = ("tests.redis_server",)


@pytest.fixture(autouse=True)
def _close_openai_clients() -> Iterator[None]:
    yield
    close_openai_clients()
