"""A tiny SSE backend that holds thousands of slow streams at once, for `turbofleet bench streams`.

It speaks just enough of LMDeploy's api_server for a router to use it: `GET /health`, `GET /v1/models`,
`GET /metrics` (empty) and `POST /v1/chat/completions` (streaming or not), HTTP/1.1 keep-alive, streams sent
chunked like uvicorn does. Every stream emits `max_tokens` tokens at `--rate` tokens/s. It is built to cost
little per stream so that the router in front of it is what a run measures:

- raw asyncio protocols, no web framework;
- one timer for all streams: a tick every `TICK_S`; each stream belongs to one of `1 / (rate * TICK_S)` phase
  buckets (the tick it started on), and a tick writes the next token of every stream in its bucket;
- each content event carries `"ts"`, the monotonic clock (shared by every process of the machine) when it was
  written, so the client measures each token's transit time, backend to client, with and without a router.

Run: `python -m turbofleet.bench.streamsrv --port P [--rate 20] [--model M]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import time
from typing import cast

TICK_S = 0.005
_HEAD_LIMIT = 64 * 1024
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def response(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status, reason, content_type, len(body), body)


class Ticker:
    """Writes the next token of every stream whose phase bucket is due, one tick at a time."""

    def __init__(self, rate: float, model: str) -> None:
        self.buckets: list[set[Stream]] = [set() for _ in range(max(1, round(1.0 / (rate * TICK_S))))]
        self.tick = 0
        self.model = model
        self.streams = 0
        prefix = json.dumps({"id": "chatcmpl-streams", "object": "chat.completion.chunk", "created": 0,
                             "model": model}, separators=(",", ":"))[:-1]
        # `ts` last, so the event can be built by one %-format: content event, then final event
        self.event = (prefix + ',"choices":[{"index":0,"delta":{"content":"tok "},"finish_reason":null}],'
                      '"ts":%.6f}').encode()
        self.last_event = (prefix + ',"choices":[{"index":0,"delta":{"content":"tok "},'
                           '"finish_reason":"length"}],"ts":%.6f}').encode()
        self.usage = (prefix + ',"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":%d,'
                      '"total_tokens":%d,"prompt_tokens_details":{"cached_tokens":0}}}').encode()

    def add(self, stream: Stream) -> None:
        self.buckets[self.tick % len(self.buckets)].add(stream)
        self.streams += 1
        stream.emit(time.monotonic())  # the first token at once; the rest on the bucket's ticks

    def remove(self, stream: Stream) -> None:
        for b in self.buckets:
            if stream in b:
                b.discard(stream)
                self.streams -= 1
                return

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        nxt = loop.time()

        def step() -> None:
            nonlocal nxt
            self.tick += 1
            bucket = self.buckets[self.tick % len(self.buckets)]
            now = time.monotonic()
            done = [s for s in bucket if s.emit(now)]
            for s in done:
                bucket.discard(s)
                self.streams -= 1
            nxt += TICK_S
            # a late tick runs at once rather than bunching: streams keep their phase
            loop.call_at(max(nxt, loop.time()), step)

        loop.call_at(nxt, step)


class Stream:
    __slots__ = ("left", "owner", "sent", "ticker", "total")

    def __init__(self, owner: Conn, ticker: Ticker, tokens: int) -> None:
        self.owner = owner
        self.ticker = ticker
        self.left = tokens
        self.total = tokens
        self.sent = 0

    def emit(self, now: float) -> bool:
        """Write the next token (and the end of the stream after the last). True when the stream is over."""
        t = self.owner.transport
        if t is None or t.is_closing():
            return True
        self.left -= 1
        self.sent += 1
        if self.left > 0:
            t.write(chunk(b"data: " + (self.ticker.event % now) + b"\n\n"))
            return False
        t.write(b"".join((
            chunk(b"data: " + (self.ticker.last_event % now) + b"\n\n"),
            chunk(b"data: " + (self.ticker.usage % (self.total, self.total + 2)) + b"\n\n"),
            chunk(b"data: [DONE]\n\n"),
            b"0\r\n\r\n",
        )))
        self.owner.stream = None
        return True


class Conn(asyncio.Protocol):
    """One client connection: requests one after another (keep-alive)."""

    def __init__(self, ticker: Ticker, default_tokens: int) -> None:
        self.ticker = ticker
        self.default_tokens = default_tokens
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.stream: Stream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.ticker.remove(self.stream)
            self.stream = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _HEAD_LIMIT:
                    self.transport.close()
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            parts = lines[0].split(" ")
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self.handle(parts[0] if parts else "", parts[1] if len(parts) > 1 else "/", body)

    def handle(self, method: str, path: str, body: bytes) -> None:
        t = self.transport
        assert t is not None
        path = path.split("?", 1)[0]
        if method == "GET" and path == "/health":
            t.write(response(200, b""))
        elif method == "GET" and path == "/v1/models":
            models = {"object": "list", "data": [{"id": self.ticker.model, "object": "model", "owned_by": "bench"}]}
            t.write(response(200, json.dumps(models).encode()))
        elif method == "GET" and path == "/metrics":
            t.write(response(200, b"", b"text/plain"))
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            try:
                req = json.loads(body)
                tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or self.default_tokens)
                stream = bool(req.get("stream"))
            except (ValueError, TypeError, AttributeError):
                t.write(response(400, b'{"error":{"message":"bad json","type":"invalid_request_error"}}'))
                return
            if stream:
                t.write(_SSE_HEAD)
                self.stream = Stream(self, self.ticker, max(1, tokens))
                self.ticker.add(self.stream)
            else:
                answer = {"id": "chatcmpl-streams", "object": "chat.completion", "created": 0,
                          "model": self.ticker.model,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok " * tokens},
                                       "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 2, "completion_tokens": tokens, "total_tokens": tokens + 2,
                                    "prompt_tokens_details": {"cached_tokens": 0}}}
                t.write(response(200, json.dumps(answer).encode()))
        else:
            t.write(response(404, b'{"error":{"message":"not found","type":"not_found"}}'))


def raise_nofile() -> tuple[int, int]:
    """Soft open-file limit up to the hard one; returns the limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def serve(host: str, port: int, rate: float, tokens: int, model: str) -> None:
    loop = asyncio.get_running_loop()
    ticker = Ticker(rate, model)
    server = await loop.create_server(lambda: Conn(ticker, tokens), host, port, backlog=8192, reuse_address=True)
    ticker.start(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m turbofleet.bench.streamsrv", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream (default 20)")
    p.add_argument("--tokens", type=int, default=500, help="tokens when a request has no max_tokens")
    p.add_argument("--model", default="sim-model")
    a = p.parse_args(argv)
    raise_nofile()
    from turbofleet.bench import aio

    aio.run(serve(a.host, a.port, a.rate, a.tokens, a.model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
