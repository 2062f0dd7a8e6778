"""A delaying TCP relay: latency and jitter on a link, where the kernel has no tc `netem`.

`python -m turbofleet.bench.delay_relay --listen 10.218.18.21:9000 --to 127.0.0.1:8000 --delay-ms 10 --jitter-ms 2.5`

Every chunk read from either side is written to the other `delay ± jitter` later (uniform jitter), in order:
a chunk never overtakes the one before it, as on a real link, so jitter shows as bunching, not reordering. A
half-close (EOF) travels the same way after the data, a reset closes both sides. The relay adds its delay in
each direction, so a request/response round trip through it pays twice the delay. Part of the network test bed
(bench/netbed.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class Link:
    """One direction of one connection: hold each chunk until its release time, then write it."""

    def __init__(self, delay: float, jitter: float, rng: random.Random) -> None:
        self.delay, self.jitter, self.rng = delay, jitter, rng
        self.last = 0.0

    def release_at(self, now: float) -> float:
        t = now + max(0.0, self.delay + self.rng.uniform(-self.jitter, self.jitter))
        self.last = max(self.last, t)  # never overtake the chunk before
        return self.last


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
    queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

    async def read() -> None:
        try:
            while chunk := await reader.read(65536):
                queue.put_nowait((link.release_at(time.monotonic()), chunk))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((link.release_at(time.monotonic()), None))

    async def write() -> None:
        while True:
            at, chunk = await queue.get()
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if chunk is None:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    reading = asyncio.create_task(read())
    try:
        await write()
    finally:
        reading.cancel()


async def serve(listen: tuple[str, int], to: tuple[str, int], delay: float, jitter: float,
                seed: int | None = None) -> asyncio.Server:
    rng = random.Random(seed)

    async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            u_reader, u_writer = await asyncio.open_connection(*to)
        except OSError:
            c_writer.close()
            return
        try:
            up = asyncio.create_task(_pump(c_reader, u_writer, Link(delay, jitter, rng)))
            down = asyncio.create_task(_pump(u_reader, c_writer, Link(delay, jitter, rng)))
            # both directions run to their EOF; an error on either side ends the pair
            done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
            if any(t.exception() for t in done if not t.cancelled()):
                for t in pending:
                    t.cancel()
            else:
                await asyncio.gather(*pending, return_exceptions=True)
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (c_writer, u_writer):
                w.close()

    return await asyncio.start_server(handle, *listen, reuse_address=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--to", required=True, metavar="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one-way delay added to each direction")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform jitter, ± this much")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()

    async def run() -> None:
        server = await serve(_hostport(args.listen), _hostport(args.to), args.delay_ms / 1000,
                             args.jitter_ms / 1000, args.seed)
        print(f"delay relay {args.listen} -> {args.to}: {args.delay_ms} ± {args.jitter_ms} ms each way",
              flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
