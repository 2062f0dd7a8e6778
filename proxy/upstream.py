"""A lean HTTP/1.1 client for the proxy's hot path: keep-alive pools per worker on raw asyncio protocols.

Why not aiohttp's client: on one core it costs about 200 µs per proxied request (request objects, header
multidicts, timers, tracing hooks), which caps the proxy near 3,600 req/s while aiohttp's server alone does
13,000. The proxy sends one kind of request (a POST with a JSON body to a known worker) and relays the answer,
so this client does only that: one write per request, a small response parser (Content-Length, chunked, or
until close), and body chunks handed over as they arrive.

The interface mirrors the parts of aiohttp's ClientResponse the relay uses (`status`, `headers`,
`content.readany()`, `read()`, `release()`), and failures raise aiohttp's own exception classes, so callers
handle both clients alike. A response released before its end closes its connection: that is how an upstream
generation is cancelled when the client goes away.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import re
import socket
import ssl
import sys
import time
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp

#: a connection buffers at most this much unread body before it stops reading from the socket
_HIGH_WATER = 1 << 20
_MAX_HEAD = 64 * 1024
#: one header field of a response head (the head decoded as latin-1): its name and value, blanks around
#: either dropped; a line without a colon matches nothing, so a head whose line count differs is malformed
_FIELD = re.compile(r"[ \t]*([^:\r\n]*?)[ \t]*:[ \t]*([^\r\n]*?)[ \t]*(?:\r\n|\Z)")


class UpstreamConnectError(aiohttp.ClientConnectionError):
    """The worker could not be connected to (refused, unreachable, connect timeout)."""


class UpstreamConnectTimeout(UpstreamConnectError):
    """The worker did not accept the connection within the connect timeout."""


class UpstreamDisconnected(aiohttp.ServerDisconnectedError):
    """The worker closed the connection before the response was complete."""


class UpstreamProtocolError(aiohttp.ClientPayloadError):
    """The worker sent something that is not HTTP/1.1 as we know it."""


class Headers(dict[str, str]):
    """Response headers with case-insensitive lookup (keys stored lower-case; the last value wins)."""

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)

    #: `get` for a key already in lower case (dict's own, no Python frame: the relay's hot path)
    lookup = dict.get


class UpstreamResponse:
    """One response, read as it arrives. `content` is the response itself (aiohttp's `resp.content` shape)."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_done", "_error", "_waiter", "headers", "status")

    def __init__(self, conn: _Conn, status: int, headers: Headers) -> None:
        self._conn: _Conn | None = conn
        self.status = status
        self.headers = headers
        # a list, not a deque: an empty deque is 760 bytes (a 64-slot block), a list 56; a stream's response
        # holds at most a few chunks between reads (issue 16: memory per open stream)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content(self) -> UpstreamResponse:
        return self

    # fed by the protocol
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if not self._done:
            self._done = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    async def readany(self) -> bytes:
        """The next bytes available (everything buffered so far); b"" once the body has ended."""
        while (data := self.take()) is None:
            await self.wait()
        return data

    def take(self) -> bytes | None:
        """What `readany` would return now, without waiting: everything buffered (b"" once the body has
        ended; its error raised), or None when nothing has come yet (then await `wait()`). A relay loop that
        takes and waits itself resumes one frame fewer per chunk than one awaiting `readany` (issue 16)."""
        chunks = self._chunks
        if not chunks:
            if self._done:
                if self._error is not None:
                    raise self._error
                return b""
            return None
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered > _HIGH_WATER and self._conn is not None:
            self._conn.resume()
        self._buffered = 0
        return data

    def wait(self) -> asyncio.Future[None]:
        """A future done when `take` has something new to say (bytes, the end, an error). One waiter at a time;
        a waiter that was cancelled or already woken is simply replaced."""
        w: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiter = w
        return w

    async def read(self, n: int = -1) -> bytes:
        """The whole remaining body (or at most n bytes of it, when n >= 0)."""
        parts: list[bytes] = []
        size = 0
        while n < 0 or size < n:
            chunk = await self.readany()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        data = b"".join(parts)
        if n >= 0 and len(data) > n:
            self._chunks.insert(0, data[n:])
            self._buffered += len(data) - n
            data = data[:n]
        return data

    def release(self) -> None:
        """Give the connection back when the body was read to its end; otherwise close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._error is None and not self._chunks:
            conn.reusable()
        else:
            conn.close()

    close = release


class _Conn(asyncio.Protocol):
    """One keep-alive connection to one worker, carrying one request at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self.idle_since = 0.0
        self.received_any = False
        self._head = bytearray()
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._resp: UpstreamResponse | None = None
        # body framing: "length", "chunked", "close", or "" when no response is in progress
        self._mode = ""
        self._left = 0
        self._chunk_buf = bytearray()
        self._paused = False

    # ---------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they have the same methods
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
                # TCP_USER_TIMEOUT: the request was never acknowledged, so the worker never saw it (a host gone
                # silent, issue 18): as safe to send elsewhere as a connect that timed out
                waiter.set_exception(UpstreamConnectTimeout(
                    f"{self.key[1]}:{self.key[2]} acknowledged nothing within the connect timeout"))
            else:
                waiter.set_exception(UpstreamDisconnected(f"connection to {self.key[1]}:{self.key[2]} closed"))
        resp = self._resp
        if resp is not None:
            if self._mode == "close" and exc is None:
                resp._finish()
            else:
                resp._finish(UpstreamDisconnected("the worker closed the connection mid-response"))
        self._resp = None
        self.pool._forget(self)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            if self._resp is None:
                self._on_head(data)
            else:
                self._on_body(data)
        except UpstreamProtocolError as e:
            self._fail(e)

    # ---------------------------------------------------------------- parsing
    def _on_head(self, data: bytes) -> None:
        if self._head_waiter is None:
            self.keep_alive = False  # bytes nobody asked for: do not reuse this connection
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > _MAX_HEAD:
                raise UpstreamProtocolError("response head too large")
            return
        text, rest = self._head[:end].decode("latin-1"), bytes(self._head[end + 4:])
        self._head.clear()
        status_line, _, fields = text.partition("\r\n")
        try:
            version, code = status_line.split(" ", 2)[:2]
            status = int(code)
        except ValueError:
            raise UpstreamProtocolError(f"bad status line {status_line[:80]!r}") from None
        if status < 200:  # 1xx: an interim answer; the real head follows
            if rest:
                self._on_head(rest)
            return
        headers = Headers()
        if fields:
            pairs = _FIELD.findall(fields)
            if len(pairs) != fields.count("\r\n") + 1:
                raise UpstreamProtocolError("bad header line")
            for name, value in pairs:
                # dict's own store: the keys are lower-case already; interned, so the few names workers send
                # exist once, not once per response held by an open stream (issue 16)
                headers[sys.intern(name.lower())] = value
        look = headers.lookup
        conn_hdr = look("connection", "").lower()
        if (version == "HTTP/1.0" and "keep-alive" not in conn_hdr) or "close" in conn_hdr:
            self.keep_alive = False
        resp = UpstreamResponse(self, status, headers)
        self._resp = resp
        length = look("content-length")
        if status in (204, 304):
            self._mode, self._left = "length", 0
        elif "chunked" in look("transfer-encoding", "").lower():
            self._mode = "chunked"
        elif length is not None:
            try:
                self._mode, self._left = "length", int(length)
            except ValueError:
                raise UpstreamProtocolError("bad Content-Length") from None
        else:
            self._mode, self.keep_alive = "close", False
        waiter, self._head_waiter = self._head_waiter, None
        if not waiter.done():
            waiter.set_result(resp)
        if self._mode == "length" and self._left == 0:
            self._end_body()
        if rest:
            self._on_body(rest)

    def _on_body(self, data: bytes) -> None:
        resp = self._resp
        if resp is None:
            return
        if self._mode == "length":
            take = data[: self._left] if len(data) > self._left else data
            self._left -= len(take)
            if take:
                resp._feed(take)
            if self._left == 0:
                if len(data) > len(take):
                    self.keep_alive = False  # extra bytes after the body: do not trust this connection
                self._end_body()
        elif self._mode == "chunked":
            self._on_chunked(data, resp)
        else:
            resp._feed(data)

    def _on_chunked(self, data: bytes, resp: UpstreamResponse) -> None:
        out: list[bytes] = []
        if self._left == 0 and not self._chunk_buf:
            # the common case (a streamed answer): each read holds whole chunks, one event each, so they are
            # cut out of `data` in place; whatever is not a whole plain chunk goes on to the general parser
            pos, n = 0, len(data)
            while pos < n:
                line_end = data.find(b"\r\n", pos, pos + 18)
                if line_end < 0:
                    break
                try:
                    size = int(data[pos:line_end], 16)
                except ValueError:  # an extension, or a bad size line: the general parser says which
                    break
                end = line_end + 2 + size
                if size <= 0 or data[end:end + 2] != b"\r\n":  # the last chunk, or one not whole yet
                    break
                out.append(data[line_end + 2:end])
                pos = end + 2
            if pos == n:
                if out:
                    resp._feed(out[0] if len(out) == 1 else b"".join(out))
                return
            if pos:
                data = data[pos:]
        buf = self._chunk_buf
        buf += data
        while True:
            if self._left > 0:  # inside a chunk's data
                if not buf:
                    break
                n = min(self._left, len(buf))
                out.append(bytes(buf[:n]))
                del buf[:n]
                self._left -= n
                if self._left == 0:
                    self._left = -2  # expect the CRLF after the data
                continue
            if self._left == -2:
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise UpstreamProtocolError("bad chunk terminator")
                del buf[:2]
                self._left = 0
                continue
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > 1024:
                    raise UpstreamProtocolError("bad chunk size line")
                break
            size_field = bytes(buf[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise UpstreamProtocolError("bad chunk size") from None
            if size == 0:
                # the last chunk: optional trailer lines, then an empty line
                rest = bytes(buf[line_end + 2:])
                if rest.startswith(b"\r\n"):
                    end = 2
                else:
                    found = rest.find(b"\r\n\r\n")
                    if found < 0:
                        break  # wait for the end of the trailer
                    end = found + 4
                if len(rest) > end:
                    self.keep_alive = False  # bytes after the response: do not trust this connection
                del buf[:]
                if out:
                    resp._feed(b"".join(out))
                    out = []
                self._end_body()
                return
            del buf[: line_end + 2]
            self._left = size
        if out:
            resp._feed(out[0] if len(out) == 1 else b"".join(out))

    def _end_body(self) -> None:
        resp, self._resp = self._resp, None
        self._mode = ""
        self._left = 0
        self._chunk_buf.clear()
        if resp is not None:
            resp._finish()

    def _fail(self, error: BaseException) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self._resp is not None:
            self._resp._finish(error)
            self._resp = None
        self.close()

    # ---------------------------------------------------------------- pool side
    def send(self, data: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self._head_waiter = asyncio.get_running_loop().create_future()
        self.received_any = False
        self.transport.write(data)
        return self._head_waiter

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def reusable(self) -> None:
        if self.keep_alive and not self.closed and self._resp is None:
            self.resume()
            self.pool._put_back(self)
        else:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self.pool._forget(self)


def _ack_timeout(conn: _Conn, seconds: float) -> None:
    """Abort the connection when data we sent stays unacknowledged for `seconds` (TCP_USER_TIMEOUT, Linux).

    A kept-alive connection to a host that went silent (no RST, no FIN) would otherwise hold a request until
    the first-byte timeout; with this the kernel gives up after the connect timeout and the request is tried
    elsewhere (issue 18). A worker that is merely slow acknowledges the request at once, so it is unaffected;
    while a response streams the proxy sends nothing, so the idle timeout alone governs that.
    """
    sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
    if sock is None or not seconds or not hasattr(socket, "TCP_USER_TIMEOUT"):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))


class UpstreamPool:
    """Keep-alive connections per worker. Not thread-safe; one per event loop."""

    def __init__(self, *, keepalive_timeout: float = 30.0, max_idle_per_host: int = 256,
                 connect_timeout: float = 3.0) -> None:
        self.keepalive_timeout = keepalive_timeout
        self.max_idle_per_host = max_idle_per_host
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, str, int], collections.deque[_Conn]] = {}
        self._all: set[_Conn] = set()
        self._targets: dict[str, tuple[tuple[str, str, int], str, bytes]] = {}
        self._ssl: ssl.SSLContext | None = None
        #: closes idle connections once they are older than keepalive_timeout (issue 11: without it a pool
        #: kept every connection it ever opened, thousands after a burst or a loop); armed while any is idle
        self._sweeper: asyncio.TimerHandle | None = None

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - self.keepalive_timeout
        left = False
        for idle in self._idle.values():
            while idle and (idle[0].closed or idle[0].idle_since <= cutoff):  # oldest first (put back on the right)
                idle.popleft().close()
            left = left or bool(idle)
        if left:
            self._arm_sweeper()

    def _arm_sweeper(self) -> None:
        if self._sweeper is None and self.keepalive_timeout > 0:
            self._sweeper = asyncio.get_running_loop().call_later(self.keepalive_timeout / 2, self._sweep)

    def _target(self, url: str) -> tuple[tuple[str, str, int], str, bytes]:
        """(pool key, path, Host header) of a URL; cached, since the proxy talks to few distinct URLs."""
        hit = self._targets.get(url)
        if hit is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamConnectError(f"cannot send to {url!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            host_header = parts.netloc.encode("idna" if not parts.netloc.isascii() else "ascii")
            hit = ((parts.scheme, parts.hostname, port), path, host_header)
            if len(self._targets) > 4096:
                self._targets.clear()
            self._targets[url] = hit
        return hit

    async def _connect(self, key: tuple[str, str, int]) -> _Conn:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        ssl_ctx: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ssl_ctx = self._ssl
        try:
            async with asyncio.timeout(self.connect_timeout or None):
                _, conn = await loop.create_connection(lambda: _Conn(self, key), host, port, ssl=ssl_ctx)
        except TimeoutError as e:
            raise UpstreamConnectTimeout(f"connect to {host}:{port} timed out") from e
        except OSError as e:
            raise UpstreamConnectError(f"cannot connect to {host}:{port}: {e.strerror or e}") from e
        _ack_timeout(conn, self.connect_timeout)
        self._all.add(conn)
        return conn

    def _take_idle(self, key: tuple[str, str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_timeout:
                return conn
            conn.close()
        return None

    def _put_back(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, collections.deque())
        if len(idle) >= self.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)
        if self._sweeper is None:
            self._arm_sweeper()

    def _forget(self, conn: _Conn) -> None:
        self._all.discard(conn)

    async def request(self, method: str, url: str, body: bytes = b"",
                      headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        """Send a request and return once the response head arrived. Raises UpstreamConnectError when the
        worker cannot be reached and UpstreamDisconnected when it hangs up before answering."""
        key, path, host = self._target(url)
        head = [method.encode(), b" ", path.encode(), b" HTTP/1.1\r\nHost: ", host,
                b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
        if headers:
            for k, v in headers.items():
                head += [k.encode("latin-1"), b": ", v.encode("latin-1"), b"\r\n"]
        head.append(b"\r\n")
        data = b"".join(head) + body if len(body) < 65536 else b"".join(head)
        for reuse in (True, False):
            conn = self._take_idle(key) if reuse else None
            if conn is None:
                conn, reuse = await self._connect(key), False
            assert conn.transport is not None
            waiter = conn.send(data)
            if len(body) >= 65536:
                conn.transport.write(body)
            try:
                return await waiter
            except UpstreamDisconnected:
                # a kept-alive connection the worker had already closed: nothing was processed, send again
                if reuse and not conn.received_any:
                    conn.close()
                    continue
                conn.close()
                raise
            except BaseException:
                conn.close()  # cancelled or failed while waiting: the worker must see the hang-up
                raise
        raise UpstreamDisconnected("unreachable")  # pragma: no cover - the loop always returns or raises

    async def post(self, url: str, data: bytes, headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        return await self.request("POST", url, data, headers)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
        for idle in self._idle.values():
            idle.clear()
        self._all.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks before the loop may end
