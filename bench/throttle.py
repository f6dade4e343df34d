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


# An HTTP proxy that answers some requests itself, the way a busy S3/R2 bucket or a rate-limited Hub
# does: the first try of a chosen request gets the error, every retry of the same request goes
# through. A retry is the same method, path, query (an UploadPart's partNumber and uploadId) and
# Range; other headers differ between tries (the signature's date), so they are not part of it.

S3_ERRORS = (  # the three answers a busy S3 or R2 bucket gives, in the XML form S3 writes
    (503, "SlowDown", "Please reduce your request rate."),
    (429, "TooManyRequests", "Reduce your concurrent request rate for the same object."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
)
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}


def s3_kind(method: str, path: str, query: dict[str, list[str]]) -> str:
    """What an S3 request is, by its method and query: create, part, complete, put, head, get, list..."""
    if method == "POST":
        return "create" if "uploads" in query else "complete" if "uploadId" in query else "post"
    if method == "PUT":
        return "part" if "partNumber" in query else "copy-or-put"
    if method == "GET":
        return "list" if path.count("/") <= 1 or "list-type" in query else "get"
    return method.lower()


def every_nth_first_try(n: int, kinds: set[str] | None = None, errors=S3_ERRORS):
    """A rule: the first try of every n-th request of each kind (the first of each kind included)
    gets the next of `errors`, as S3's XML error. `kinds`: only those kinds (None: all)."""
    seen: dict[str, int] = {}
    turn = [0]

    def rule(method: str, path: str, query: dict) -> tuple[int, dict[str, str], bytes] | None:
        kind = s3_kind(method, path, query)
        if kinds is not None and kind not in kinds:
            return None
        count = seen.get(kind, 0)
        seen[kind] = count + 1
        if count % n:
            return None
        status, code, message = errors[turn[0] % len(errors)]
        turn[0] += 1
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>{path}</Resource><RequestId>mf-proxy-{turn[0]}</RequestId></Error>").encode()
        return status, {"Content-Type": "application/xml"}, body

    return rule


class Faulty:
    """Proxy 127.0.0.1:`port` -> 127.0.0.1:`target_port`. `rule(method, path, query)` runs once per
    distinct request and returns None (forward it) or (status, headers, body) to answer its first
    try with. `log` holds (kind, path, query, status) of every request, answered here or upstream.
    `blackhole()` makes it hold every later request unanswered (a bucket that stops mid-run)."""

    def __init__(self, target_port: int, rule):
        import http.server

        self.target_port, self.rule = target_port, rule
        self.log: list[tuple[str, str, str, int]] = []
        self.decided: dict[tuple, object] = {}
        self.lock = threading.Lock()
        self.held = threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_expect_100(self):
                # S3 answers an error instead of 100 Continue, before the body is sent.
                if proxy._answer_first_try(self):
                    self.close_connection = True
                    return False
                return super().handle_expect_100()

            def _any(self):
                if proxy.held.is_set():
                    time.sleep(3600)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Expect", "").lower() != "100-continue" and proxy._answer_first_try(self):
                    return
                proxy._forward(self, body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._upstream = threading.local()

    def __enter__(self) -> "Faulty":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.held.clear()
        self.server.shutdown()
        self.server.server_close()

    def blackhole(self) -> None:
        self.held.set()

    @staticmethod
    def _identity(handler) -> tuple[str, str, dict, tuple]:
        from urllib.parse import parse_qs, urlsplit

        url = urlsplit(handler.path)
        query = parse_qs(url.query, keep_blank_values=True)
        signed = {"X-Amz-Date", "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Expires", "X-Amz-SignedHeaders"}
        ident = (handler.command, url.path, tuple(sorted((k, tuple(v)) for k, v in query.items() if k not in signed)),
                 handler.headers.get("Range", ""))  # each ranged GET of an object is a request of its own
        return handler.command, url.path, query, ident

    def _answer_first_try(self, handler) -> bool:
        method, path, query, ident = self._identity(handler)
        with self.lock:
            first = ident not in self.decided
            if first:
                self.decided[ident] = self.rule(method, path, query)
            answer = self.decided[ident] if first else None
        if answer is None:
            return False
        status, headers, body = answer
        self.log.append((s3_kind(method, path, query), path, handler.path.partition("?")[2], status))
        handler.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body)), "Connection": "close"}.items():
            handler.send_header(k, v)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(body)
        handler.close_connection = True
        return True

    def _forward(self, handler, body: bytes) -> None:
        import http.client

        method, path, query, _ = self._identity(handler)
        conn = getattr(self._upstream, "conn", None)
        for attempt in (1, 2):  # a kept-alive upstream connection may have been closed meanwhile
            if conn is None:
                conn = self._upstream.conn = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=120)
            try:
                conn.putrequest(method, handler.path, skip_host=True, skip_accept_encoding=True)
                for k, v in handler.headers.items():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        conn.putheader(k, v)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                conn = self._upstream.conn = None
                if attempt == 2:
                    handler.send_error(502)
                    return
        self.log.append((s3_kind(method, path, query), path, handler.path.partition("?")[2], resp.status))
        handler.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and not (k.lower() == "content-length" and method != "HEAD"):
                handler.send_header(k, v)
        if method != "HEAD":
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(data)

    def answered(self, status: int | None = None, kind: str | None = None) -> list[tuple[str, str, str, int]]:
        """The logged requests, of that status and kind when given."""
        return [e for e in self.log if (status is None or e[3] == status) and (kind is None or e[0] == kind)]
