"""A per-try deadline for the relay: one timer that cancels the try's task when the worker makes no progress.

`asyncio.timeout()` would do, but moving its deadline (`reschedule`) creates a new timer each time, and the
relay moves it on every chunk it relays. Here progress is a float store and the timer re-arms itself lazily.
"""

from __future__ import annotations

import asyncio

#: why a deadline ended a try
TIMEOUT, SHUTDOWN = "timeout", "shutdown"


class Deadline:
    """Cancels the task that created it when no progress was marked (`last = loop.time()`) for `span`
    seconds: the first-byte budget, then (`rearm`) the idle gap between chunks. On CancelledError the owner asks
    `caught()` whether the cancellation was this deadline's, and why (TIMEOUT, or SHUTDOWN after `abort`)."""

    __slots__ = ("_base", "_due", "_handle", "_loop", "_span", "_task", "last", "why")

    def __init__(self, loop: asyncio.AbstractEventLoop, span: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._loop = loop
        self._task = task
        self._base = task.cancelling()
        self._span = span
        self.last = loop.time()
        self._due = self.last + span
        self.why: str | None = None
        self._handle = loop.call_at(self._due, self._check)

    def rearm(self, span: float) -> None:
        """From now on allow `span` seconds between marks."""
        self._span = span
        self.last = now = self._loop.time()
        if now + span < self._due:  # the pending timer would fire too late
            self._handle.cancel()
            self._due = now + span
            self._handle = self._loop.call_at(self._due, self._check)

    def _check(self) -> None:
        due = self.last + self._span
        if self._loop.time() + 0.001 >= due:  # timers may fire a hair early (millisecond resolution)
            self._fire(TIMEOUT)
        else:
            self._due = due
            self._handle = self._loop.call_at(due, self._check)

    def _fire(self, why: str) -> None:
        if self.why is None:
            self.why = why
            self._task.cancel()

    def abort(self) -> None:
        """End the try now: the proxy is shutting down."""
        self._handle.cancel()
        self._fire(SHUTDOWN)

    def caught(self) -> str | None:
        """Call on CancelledError. Returns why this deadline cancelled the task (the caller then handles it
        instead of the CancelledError), or None when someone else cancelled it too: the client went away."""
        why = self.why
        if why is None:
            return None
        self.why = None
        self._handle.cancel()
        if self._task.uncancel() > self._base:
            return None
        return why

    def absorb(self) -> bool:
        """Consume a cancellation that came from elsewhere (the client left after the stream's end). True when
        no other cancellation is pending, so the caller may finish normally."""
        return self._task.uncancel() <= self._base

    def close(self) -> None:
        self._handle.cancel()
