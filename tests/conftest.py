"""Fixtures shared by every test module: the real redis-server fixture (tests/redis_kit.py), and the
closing of every `openai` client a test made through `tests.procs_kit.openai_client`."""

from collections.abc import Iterator

import pytest

from tests.procs_kit import close_openai_clients

pytest_plugins = ("tests.redis_kit",)


@pytest.fixture(autouse=True)
def _close_openai_clients() -> Iterator[None]:
    yield
    close_openai_clients()
