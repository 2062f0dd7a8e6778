"""The lean client of `turbofleet bench streams`: N streaming requests held open at once, on raw asyncio protocols.

Per stream it parses only the HTTP status line and headers, undoes chunked framing, counts content events
(each carries `"ts"`, the backend's write time on the machine's monotonic clock) and looks for `data: [DONE]`.
One stream in `sample_every` also records, per token, its transit time (arrival minus `ts`) and the gap since
the previous token (inter-token latency). Everything else is a few byte searches per read, so one client
process holds 10,000 streams on a fraction of a core.

Every stream also records how long its connect took and when its status line came (from the moment it was
opened): a router whose accept queue is full shows up there first. A full queue drops the handshake's last
ACK, so the client's connect succeeds while the server has not accepted; the server retransmits its SYN-ACK
(net.ipv4.tcp_synack_retries, about a minute) and then forgets the connection, and the client's next packet
gets a reset. So failures are told apart by where they happened:

- `connect`: the connection could not be made (refused, unreachable); `connect_timeout`: no handshake within
  `connect_timeout_s` (the SYN was never answered);
- `reset_before_status`: connected, then reset before any byte of the answer (the accept-queue case above);
- `closed_before_status`: connected, then closed (FIN) by the other side before a status line;
- `broken_stream`, `short_stream`, `no_done`, `sse_error`, `http_<status>`, `bad_response`, `bad_chunk`,
  `timeout`: after the status line, see the code.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import cast

TS = re.compile(rb'"ts":([0-9.]+)')
_MARK = b'"ts":'


@dataclass
class StreamStats:
    """What all the streams of one run saw."""

    started: int = 0
    #: streams that have their status line or have ended (all_open is set when every stream has one)
    responded: int = 0
    expect: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    transit_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    #: per stream that connected: seconds its connect took; per stream with a status line: seconds from the
    #: open to the status line (the accept queue's wait, the router's routing and the backend's first byte)
    connect_s: list[float] = field(default_factory=list)
    status_s: list[float] = field(default_factory=list)
    tokens: int = 0
    first_done: float | None = None
    all_open: float | None = None

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def respond(self) -> None:
        """A stream got its status line, or ended without one; the last of `expect` sets `all_open`."""
        self.responded += 1
        if self.responded == self.expect and self.all_open is None:
            self.all_open = time.monotonic()

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class StreamProto(asyncio.Protocol):
    """One streaming request on its own connection."""

    def __init__(self, request: bytes, expect_tokens: int, sampled: bool, stats: StreamStats,
                 done: asyncio.Future[None]) -> None:
        self.request = request
        self.expect = expect_tokens
        self.sampled = sampled
        self.stats = stats
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.remaining = -1  # Content-Length left, or -1 (chunked / until close)
        self.raw = b""  # undecoded chunked bytes
        self.chunk_left = 0  # payload bytes left in the current chunk (chunked)
        self.tail = b""  # last bytes of payload, so a marker split over two reads is still found
        self.events = b""  # sampled: payload not yet cut into events
        self.tokens = 0
        self.last_token: float | None = None
        self.seen_done = False
        self.sse_error = False  # an error event inside the stream (the router gave up mid-way)
        self.status = 0
        self.finished = False
        self.opened = time.monotonic()
        self.responded = False

    # ------------------------------------------------------------------ asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio subclasses
        self.stats.connect_s.append(time.monotonic() - self.opened)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            if self.in_body and not self.chunked and self.remaining < 0:
                self._end()  # close-delimited body: the end of the connection is the end of the answer
            elif self.status == 200:
                self._finish("broken_stream")
            else:
                self._finish("reset_before_status" if isinstance(exc, ConnectionResetError)
                             else "closed_before_status")

    def data_received(self, data: bytes) -> None:
        if self.finished:
            return
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].decode("latin-1"), self.head[end + 4 :]
            self.head = b""
            lines = head.split("\r\n")
            try:
                self.status = int(lines[0].split(" ", 2)[1])
            except (IndexError, ValueError):
                self._finish("bad_response")
                return
            self.stats.status_s.append(time.monotonic() - self.opened)
            self._respond()
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name, value = name.strip().lower(), value.strip().lower()
                if name == "transfer-encoding" and "chunked" in value:
                    self.chunked = True
                elif name == "content-length":
                    self.remaining = int(value)
            if self.status != 200:
                self._finish(f"http_{self.status}")
                return
            self.in_body = True
        if self.chunked:
            self._dechunk(data)
        else:
            if self.remaining >= 0:
                data = data[: self.remaining]
                self.remaining -= len(data)
            self._payload(data)
            if self.remaining == 0:
                self._end()

    # ------------------------------------------------------------------ body
    def _dechunk(self, data: bytes) -> None:
        raw = self.raw + data if self.raw else data
        pos = 0
        while not self.finished:
            if self.chunk_left > 0:
                piece = raw[pos : pos + self.chunk_left]
                pos += len(piece)
                self.chunk_left -= len(piece)
                self._payload(piece)
                if self.chunk_left:
                    break
                self.chunk_left = -2  # the CRLF after the chunk
            if self.chunk_left == -2:
                if len(raw) - pos < 2:
                    break
                pos += 2
                self.chunk_left = 0
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            try:
                size = int(raw[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                self._finish("bad_chunk")
                return
            pos = eol + 2
            if size == 0:
                self._end()
                return
            self.chunk_left = size
        self.raw = raw[pos:]

    def _payload(self, data: bytes) -> None:
        if not data:
            return
        now = time.monotonic()
        joined = self.tail + data
        if self.sampled:
            self.events += data
            cut = self.events.rfind(b"\n\n")
            if cut >= 0:
                complete, self.events = self.events[: cut + 2], self.events[cut + 2 :]
                for m in TS.finditer(complete):
                    self.tokens += 1
                    self.stats.transit_s.append(now - float(m.group(1)))
                    if self.last_token is not None:
                        self.stats.itl_s.append(now - self.last_token)
                    self.last_token = now
        else:
            self.tokens += joined.count(_MARK)
        if b"[DONE]" in joined:
            self.seen_done = True
        if b'"error"' in joined and b'"choices"' not in joined:
            self.sse_error = True
        self.tail = joined[-8:]

    def _end(self) -> None:
        if self.sse_error:
            self._finish("sse_error")
        elif not self.seen_done:
            self._finish("no_done")
        elif self.tokens != self.expect:
            self._finish("short_stream")
        else:
            self._finish(None)

    def _respond(self) -> None:
        if not self.responded:
            self.responded = True
            self.stats.respond()

    def _finish(self, error: str | None) -> None:
        if self.finished:
            return
        self.finished = True
        self._respond()
        if error is None:
            self.stats.ok += 1
            self.stats.tokens += self.tokens
            if self.stats.first_done is None:
                self.stats.first_done = time.monotonic()
        else:
            self.stats.error(error)
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


def request_bytes(host: str, port: int, model: str, tokens: int) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello there"}],
                       "max_tokens": tokens, "stream": True, "ignore_eos": True}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def run_streams(host: str, port: int, model: str, n: int, tokens: int, ramp_s: float,
                      sample_every: int = 10, timeout_s: float = 300.0,
                      connect_timeout_s: float = 30.0) -> StreamStats:
    """Open `n` streams over `ramp_s` seconds, each asking for `tokens` tokens; wait for all of them.
    `all_open` is when the last stream got its status line (not when its connect returned: a connection in a
    full accept queue is connected but not yet served)."""
    loop = asyncio.get_running_loop()
    stats = StreamStats(expect=n)
    req = request_bytes(host, port, model, tokens)
    futures: list[asyncio.Future[None]] = []
    protos: list[StreamProto] = []
    t0 = loop.time()

    async def open_one(i: int) -> None:
        done: asyncio.Future[None] = loop.create_future()
        futures.append(done)
        proto = StreamProto(req, tokens, i % sample_every == 0, stats, done)
        protos.append(proto)
        stats.started += 1
        try:
            await asyncio.wait_for(loop.create_connection(lambda: proto, host, port), connect_timeout_s)
        except TimeoutError:
            proto._finish("connect_timeout")
        except OSError:
            proto._finish("connect")

    pending: set[asyncio.Task[None]] = set()
    for i in range(n):
        at = t0 + ramp_s * i / n
        if at > loop.time():
            await asyncio.sleep(at - loop.time())
        task = asyncio.ensure_future(open_one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)
    try:
        await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
    except TimeoutError:
        for p in protos:
            if not p.finished:
                p._finish("timeout")
    return stats
