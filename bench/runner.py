"""Drive a workload against one or more target URLs: open-loop arrivals, closed-loop slots, or multi-round users."""

from __future__ import annotations

import asyncio
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

import aiohttp

from turbofleet.bench.client import RequestResult, make_session, send_chat
from turbofleet.bench.workloads import MultiroundUser, RequestSpec, poisson_arrivals, sub_rng


def stable_hash(key: str) -> int:
    return zlib.crc32(key.encode())


class Targets:
    """Where each request goes: one URL; `alternate` between router replicas; or `pin` a session straight to
    worker hash(session) % N (the client-side "ideal pinning" pseudo-router, no router in the path)."""

    def __init__(self, urls: Sequence[str], mode: str = "single") -> None:
        if not urls:
            raise ValueError("no target URL")
        if mode not in ("single", "alternate", "pin"):
            raise ValueError(f"unknown target mode {mode!r}")
        self.urls = list(urls)
        self.mode = mode
        self._next = 0

    def pick(self, spec: RequestSpec) -> str:
        if self.mode == "pin":
            return self.urls[stable_hash(spec.session or str(spec.index)) % len(self.urls)]
        if self.mode == "alternate":
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
            return url
        return self.urls[0]


class Progress:
    """A one-line progress bar on stderr, redrawn at most 5 times a second; silent when disabled."""

    def __init__(self, total: int, label: str = "", enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.label, self.stream = total, label, stream or sys.stderr
        self.enabled = enabled
        self.done = self.errors = 0
        self._t0 = time.monotonic()
        self._last = 0.0

    def update(self, res: RequestResult) -> None:
        self.done += 1
        self.errors += 0 if res.ok else 1
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.2 or self.done == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = 30
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * width)
        self.stream.write(
            f"\r{self.label}[{bar:<{width}}] {self.done}/{self.total} req  {now - self._t0:6.1f}s  err {self.errors} "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class RunOptions:
    model: str
    concurrency: int = 16
    timeout: float = 600.0
    progress: bool = True
    label: str = ""
    extra_headers: dict[str, str] = field(default_factory=dict)
    salt: str | None = None  # the run marker every prompt opens with (workloads.salt_messages); None: unsalted


async def _sleep_until(t0: float, offset: float) -> None:
    delay = t0 + offset - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


async def run_static(
    specs: Sequence[RequestSpec], targets: Targets, opts: RunOptions, session: aiohttp.ClientSession | None = None
) -> list[RequestResult]:
    """Send every spec: at its arrival offset when it has one (open loop), else through `concurrency` slots."""
    own = session is None
    sess = session or make_session(timeout=opts.timeout)
    progress = Progress(len(specs), opts.label, opts.progress)
    results: list[RequestResult] = []
    t0 = time.perf_counter()

    async def one(spec: RequestSpec) -> None:
        res = await send_chat(sess, targets.pick(spec), spec, opts.model, t0, opts.extra_headers, opts.salt)
        results.append(res)
        progress.update(res)

    try:
        if specs and all(s.arrival is not None for s in specs):
            tasks = []
            for spec in sorted(specs, key=lambda s: (s.arrival, s.index)):
                await _sleep_until(t0, spec.arrival or 0.0)
                tasks.append(asyncio.create_task(one(spec)))
            await asyncio.gather(*tasks)
        else:
            queue = list(reversed(specs))

            async def slot() -> None:
                while queue:
                    await one(queue.pop())

            await asyncio.gather(*(slot() for _ in range(max(1, opts.concurrency))))
    finally:
        progress.close()
        if own:
            await sess.close()
    return sorted(results, key=lambda r: r.index)


async def run_multiround(
    users: Sequence[MultiroundUser],
    targets: Targets,
    opts: RunOptions,
    user_rate: float | None = None,
    seed: int = 0,
    session: aiohttp.ClientSession | None = None,
) -> list[RequestResult]:
    """Users run concurrently, each one's rounds in sequence: ask, wait for the answer, think, ask again with the
    answer in the history. Users start staggered over one think time, or as Poisson arrivals at `user_rate`."""
    own = session is None
    sess = session or make_session(timeout=opts.timeout)
    rounds = users[0].cfg.rounds if users else 0
    progress = Progress(len(users) * rounds, opts.label, opts.progress)
    results: list[RequestResult] = []
    starts = (
        poisson_arrivals(len(users), user_rate, sub_rng(seed, "user-arrivals"))
        if user_rate
        else [u.start_offset() for u in users]
    )
    t0 = time.perf_counter()

    async def conversation(user: MultiroundUser, start: float) -> None:
        await _sleep_until(t0, start)
        answer: str | None = None
        for r in range(rounds):
            spec = user.next_request(answer, index=user.user * rounds + r)
            if spec is None:
                break
            res = await send_chat(sess, targets.pick(spec), spec, opts.model, t0, opts.extra_headers, opts.salt)
            results.append(res)
            progress.update(res)
            # A failed round keeps the count of requests the same for every router: go on with an empty answer.
            answer = res.text if res.ok else ""
            if r + 1 < rounds:
                await asyncio.sleep(user.think())

    try:
        await asyncio.gather(*(conversation(u, s) for u, s in zip(users, starts, strict=True)))
    finally:
        progress.close()
        if own:
            await sess.close()
    return sorted(results, key=lambda r: r.index)
