"""The change feed's subscription: one pub/sub connection, resubscribed with backoff whenever it drops.

Messages are handed to a callback as they come. After every (re)subscription another callback runs, because
whatever was published while we were not subscribed is lost and the fleet must be re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import keys as K

log = logging.getLogger("turbofleet.registry")

#: what a lost, refused, reset or hung connection raises (TimeoutError: our own per-call limit)
IO_ERRORS = (RedisError, OSError, TimeoutError)


class Feed:
    """Subscribes to `channel` and keeps subscribed until `stop()`."""

    def __init__(
        self,
        redis: Redis,
        channel: str,
        op_timeout: float,
        on_message: Callable[[str], None],
        on_subscribed: Callable[[], None],
    ) -> None:
        self._redis = redis
        self._channel = channel
        self._op_timeout = op_timeout
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.subscribed = asyncio.Event()

    @property
    def up(self) -> bool:
        return self.subscribed.is_set()

    def restart(self) -> None:
        """(Re)start on a fresh connection: the old one may be half-dead without having noticed."""
        old = self._task
        self._task = asyncio.create_task(self._run())
        if old is not None:
            old.cancel()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            await stop_tasks([self._task], self._op_timeout)
            self._task = None

    async def _run(self) -> None:
        backoff = K.RECONNECT_MIN
        # a replaced task stops even if its cancellation was swallowed (see stop_tasks)
        while not self._stopping and self._task is asyncio.current_task():
            pubsub = self._redis.pubsub()
            try:
                async with asyncio.timeout(self._op_timeout):
                    await pubsub.subscribe(self._channel)
                    while (msg := await pubsub.get_message(timeout=self._op_timeout)) is None or (
                        msg["type"] != "subscribe"
                    ):
                        pass
                self.subscribed.set()
                self._on_subscribed()
                backoff = K.RECONNECT_MIN
                while not self._stopping:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if msg is not None and msg["type"] == "message":
                        self._on_message(str(msg["data"]))
            except IO_ERRORS as e:
                log.debug("registry: change feed lost: %r", e)
            finally:
                if self._task is asyncio.current_task():
                    self.subscribed.clear()
                with contextlib.suppress(*IO_ERRORS):
                    async with asyncio.timeout(self._op_timeout):
                        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis-py 8
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, K.RECONNECT_MAX)


async def stop_tasks(tasks: Iterable[asyncio.Task[None]], wait: float) -> None:
    """Cancel until done. On Python 3.11 a cancel that lands while the Redis client is inside its own timeout
    can come back as a TimeoutError, which our loops take for an outage; their stop flags end them then."""
    tasks = list(tasks)
    for _ in range(10):
        pending = [t for t in tasks if not t.done()]
        if not pending:
            break
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=wait)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.warning("registry: background task failed: %r", t.exception())
