"""A loopback TCP proxy that caps the bytes it sends back to clients at a shared rate: a Hub behind
a slow link, for benchmarks where the network, not this machine, must be the bottleneck (olah has
no bandwidth option of its own; rclone has `--bwlimit`)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time


class _Bucket:
    """Token bucket shared by every connection: the link's total downstream rate."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.last = rate, 0.0, time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.rate * 0.05, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


async def _pipe(reader, writer, bucket: _Bucket | None) -> None:
    try:
        while data := await reader.read(64 * 1024):
            if bucket:
                await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.contextmanager
def throttled(target_port: int, bytes_per_s: float):
    """Proxy 127.0.0.1:<yielded port> -> 127.0.0.1:target_port, server-to-client capped at bytes_per_s."""
    loop = asyncio.new_event_loop()
    bucket = _Bucket(bytes_per_s)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, up_w, None), _pipe(up_r, client_w, bucket))

    async def serve():
        return await asyncio.start_server(handle, sock=sock)

    server = loop.run_until_complete(serve())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
