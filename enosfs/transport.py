"""A lean httpx transport: HTTP/1.1 whose response bodies go from the socket into our
buffers, directly or through an HTTP proxy; every request of a mount takes it.

Why not httpx's own transport: h11 copies every body byte three times (into its
receive buffer, out of it, and into bytes), and on this 2-core machine that caps one
trio stream at about 0.6-0.7 GB/s, measured with py-spy (ReceiveBuffer._extract,
__iadd__ and maybe_extract_at_most were half of the profile). Reading with recv_into
straight into the block cache's buffers reaches about 2.2 GB/s on the same loopback,
and TLS decrypted by recv_into into the same buffers (connection.py) keeps most of it.
The default transport also spends about 2.5 ms on each small request here, against
0.5 ms for this one, which is what listings and time to first byte are made of.

h11 still writes each request head and reads each response head (status, headers,
1xx answers, conflicting lengths), fed exactly the head's bytes; bodies are framed
here (Content-Length, chunked, until close) so that their bytes never pass through
h11's buffers. A response whose length is ambiguous (two Content-Lengths, or one with
chunked) is refused: either reading of it could be a smuggled answer.

Proxies (proxies.py): an https target is reached through a CONNECT tunnel, with TLS
to the target inside it and the target's certificate verified; an http target gets
absolute-form requests. Both are pooled like direct connections. Bodies come out both
as an ordinary httpx stream and, through `response.extensions["readinto"]`, as a
readinto() for zero-copy reads.
"""

from __future__ import annotations

import logging
import ssl
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import trio

from enosfs.connection import Connection, PlainConnection, TlsConnection
from enosfs.proxies import Proxies, Proxy

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
HEAD_READ = 4096
READ_SIZE = 1024 * 1024
MAX_IDLE_PER_ORIGIN = 32
IDLE_EXPIRY = 15.0  # seconds an idle connection is trusted to still be open

Origin = tuple[str, str, int]
Headers = list[tuple[bytes, bytes]]


class _Body(httpx.AsyncByteStream):
    """One response body; gives its connection back to the pool once fully read."""

    def __init__(
        self,
        transport: LeanTransport,
        conn: Connection,
        framing: str,
        length: int | None,
        reusable: bool,
    ) -> None:
        self.transport = transport
        self.conn = conn
        self.framing = framing  # "length" | "chunked" | "close"
        self.remaining = length if framing == "length" else None
        self.chunk_left = 0
        self.reusable = reusable
        self.done = framing == "length" and length == 0
        self.closed = False

    async def readinto(self, view: memoryview) -> int:
        """Fill the start of view with body bytes; 0 at the end of the body."""
        if self.done or len(view) == 0:
            return 0
        timeout = self.transport.read_timeout
        if self.framing == "length":
            assert self.remaining is not None
            n = await self.conn.receive_into(view[: self.remaining], timeout)
            if n == 0:
                raise httpx.RemoteProtocolError(
                    f"peer closed the connection with {self.remaining} body bytes unsent"
                )
            self.remaining -= n
            self.done = self.remaining == 0
            return n
        if self.framing == "chunked":
            if self.chunk_left == 0:
                self.chunk_left = await self._next_chunk_size()
                if self.chunk_left == 0:
                    self.done = True
                    return 0
            n = await self.conn.receive_into(view[: self.chunk_left], timeout)
            if n == 0:
                raise httpx.RemoteProtocolError("peer closed the connection inside a chunk")
            self.chunk_left -= n
            if self.chunk_left == 0 and await self.conn.line(timeout) != b"":
                raise httpx.RemoteProtocolError("chunk not followed by CRLF")
            return n
        n = await self.conn.receive_into(view, timeout)
        self.done = n == 0
        return n

    async def _next_chunk_size(self) -> int:
        """A chunk-size line; h11 would frame chunks only by copying their data."""
        timeout = self.transport.read_timeout
        line = await self.conn.line(timeout)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise httpx.RemoteProtocolError(f"bad chunk size line {line[:40]!r}") from None
        if size < 0:
            raise httpx.RemoteProtocolError("negative chunk size")
        if size == 0:
            while await self.conn.line(timeout):  # trailers, up to the empty line
                pass
        return size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        while True:
            n = await self.readinto(view)
            if n == 0:
                break
            yield bytes(view[:n])

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self.done and self.reusable:
                self.transport.release(self.conn)
            else:
                await self.conn.close()
        finally:
            self.transport.slots.release()


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        verify: ssl.SSLContext | str | bool = True,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        max_connections: int = 32,
        proxies: Proxies | None = None,
    ) -> None:
        if isinstance(verify, ssl.SSLContext):
            self.ssl_context = verify
        elif isinstance(verify, str):
            self.ssl_context = ssl.create_default_context(cafile=verify)
        else:
            self.ssl_context = ssl.create_default_context()
            if not verify:
                self.ssl_context.check_hostname = False
                self.ssl_context.verify_mode = ssl.CERT_NONE
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.proxies = proxies or Proxies()
        self.idle: dict[Origin, list[Connection]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        # One slot per connection in use; a response body holds its slot until closed.
        self.max_connections = max_connections
        self.slots = trio.Semaphore(max_connections)

    @property
    def in_use(self) -> int:
        return self.max_connections - self.slots.value

    @property
    def connects(self) -> int:
        return self.counts["connections_opened"]

    def stats(self) -> dict[str, Any]:
        """Its part of /.enosfs/stats: connections busy now and opened in all, reads
        that decrypted TLS straight into a buffer, connections made through a proxy.
        Proxies are shown without credentials."""
        return {
            "in_flight": {"connections": self.in_use},
            "connections_opened": self.counts["connections_opened"],
            "transport": {
                "tls_recv_into": self.counts["tls_recv_into"],
                "proxied_connections": self.counts["proxied_connections"],
                "proxy": {
                    "http": self.proxies.http and self.proxies.http.shown,
                    "https": self.proxies.https and self.proxies.https.shown,
                },
            },
        }

    def release(self, conn: Connection) -> None:
        idle = self.idle[conn.origin]
        if len(idle) < MAX_IDLE_PER_ORIGIN:
            conn.idle_since = trio.current_time()
            idle.append(conn)
        else:
            trio.lowlevel.spawn_system_task(conn.close)

    def _pooled(self, origin: Origin) -> Connection | None:
        """The most recently used idle connection, if any is young enough to trust:
        servers close idle connections after some seconds (nginx 75, uvicorn 5, many
        gateways 15), and a dead one costs a failed attempt."""
        idle = self.idle[origin]
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < IDLE_EXPIRY:
                return conn
            trio.lowlevel.spawn_system_task(conn.close)
        return None

    async def _connect(self, origin: Origin, proxy: Proxy | None) -> Connection:
        scheme, host, port = origin
        self.counts["connections_opened"] += 1
        where = f"{host}:{port}" + (f" through the proxy {proxy.shown}" if proxy else "")
        conn: Connection | None = None
        try:
            with trio.fail_after(self.connect_timeout):
                at = (proxy.host, proxy.port) if proxy else (host, port)
                plain = PlainConnection(await trio.open_tcp_stream(*at), origin)
                conn = plain
                if proxy is not None:
                    self.counts["proxied_connections"] += 1
                    if scheme == "https":
                        await self._tunnel(plain, host, port, proxy)
                if scheme == "https":
                    conn = await TlsConnection.handshake(
                        plain, self.ssl_context, host, origin, self.counts
                    )
        except trio.TooSlowError:
            if conn is not None:
                await conn.close()
            raise httpx.ConnectTimeout(f"timed out connecting to {where}") from None
        except httpx.ProxyError:
            if conn is not None:
                await conn.close()
            raise
        except (OSError, trio.BrokenResourceError, ssl.SSLError, httpx.HTTPError) as exc:
            if conn is not None:
                await conn.close()
            cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            raise httpx.ConnectError(f"cannot connect to {where}: {cause or exc}") from exc
        except BaseException:
            if conn is not None:
                await conn.close()
            raise
        return conn

    async def _tunnel(self, conn: PlainConnection, host: str, port: int, proxy: Proxy) -> None:
        """CONNECT host:port through the proxy; the connection then leads to host."""
        authority = (f"[{host}]" if ":" in host else host).encode() + b":%d" % port
        headers: Headers = [(b"Host", authority)]
        if proxy.authorization is not None:
            headers.append((b"Proxy-Authorization", proxy.authorization))
        parser, head = _request(b"CONNECT", authority, headers)
        await conn.send_all(head, self.connect_timeout)
        answer = await self._response_head(conn, parser, self.connect_timeout)
        if not 200 <= answer.status_code < 300:
            raise httpx.ProxyError(
                f"the proxy {proxy.shown} refused to tunnel to {host}:{port}: "
                f"HTTP {answer.status_code} {answer.reason.decode(errors='replace')}"
            )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """httpx's entry point: lets an httpx.AsyncClient use this transport."""
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme}")
        content = await request.aread()
        response = await self.request(
            request.method, origin_of(url), url.raw_path, request.headers.raw, content
        )
        response.request = request
        return response

    async def request(
        self,
        method: str,
        origin: Origin,
        target: bytes,
        headers: Headers,
        content: bytes = b"",
    ) -> httpx.Response:
        """One exchange without an httpx.Request: the hot path of downloads, where
        httpx's request and client machinery cost as much as the I/O itself."""
        proxy = self.proxies.for_origin(*origin)
        headers = _with_host(headers, origin)
        if proxy is not None and origin[0] == "http":
            # Through an http proxy, an http request names its whole URL.
            target = _absolute(origin, target)
            if proxy.authorization is not None:
                headers = [*headers, (b"Proxy-Authorization", proxy.authorization)]
        await self.slots.acquire()
        try:
            # A pooled connection the server has since closed fails at once: try anew.
            for attempt in range(2):
                # The second attempt is on a new connection, never another pooled one.
                conn = self._pooled(origin) if attempt == 0 else None
                fresh = conn is None
                if conn is None:
                    conn = await self._connect(origin, proxy)
                try:
                    return await self._exchange(conn, method, target, headers, content)
                except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
                    await conn.close()
                    if fresh or attempt == 1:
                        raise
                except BaseException:
                    await conn.close()
                    raise
            raise AssertionError("unreachable")
        except BaseException:
            self.slots.release()
            raise

    async def _exchange(
        self, conn: Connection, method: str, target: bytes, headers: Headers, content: bytes
    ) -> httpx.Response:
        parser, head = _request(method.encode(), target, headers)
        await conn.send_all(head + content, self.read_timeout)
        answer = await self._response_head(conn, parser, self.read_timeout)
        status = answer.status_code
        fields = answer.headers  # names lower-cased by h11
        names = {name for name, _ in fields}
        if b"content-length" in names and b"transfer-encoding" in names:
            raise httpx.RemoteProtocolError("Content-Length together with Transfer-Encoding")
        connection = b",".join(v for n, v in fields if n == b"connection").lower()
        reusable = answer.http_version == b"1.1" and b"close" not in connection
        if method == "HEAD" or status in (204, 304):
            framing, length = "length", 0
        elif b"transfer-encoding" in names:  # h11 lets only "chunked" through
            framing, length = "chunked", None
        elif b"content-length" in names:  # one value: h11 refuses conflicting ones
            framing, length = "length", int(next(v for n, v in fields if n == b"content-length"))
        else:
            framing, length, reusable = "close", None, False
        body = _Body(self, conn, framing, length, reusable)
        return httpx.Response(
            status,
            headers=list(fields.raw_items()),
            stream=body,
            extensions={"http_version": b"HTTP/" + answer.http_version, "readinto": body.readinto},
        )

    async def _response_head(
        self, conn: Connection, parser: h11.Connection, timeout: float
    ) -> h11.Response:
        """The final response head, past any 1xx ones; h11 is fed exactly each head's
        bytes, and what follows stays in the connection's buffer for the body."""
        while True:
            raw = bytearray()
            while (end := raw.find(b"\r\n\r\n")) < 0:
                if len(raw) > MAX_HEAD:
                    raise httpx.RemoteProtocolError("response head too large")
                # Small reads: body bytes read with the head are copied out again.
                data = await conn.receive(HEAD_READ, timeout)
                if not data:
                    raise httpx.RemoteProtocolError(
                        "server closed the connection without answering"
                    )
                raw += data
            conn.buffer[:0] = raw[end + 4 :]  # unread bytes go back in front
            try:
                parser.receive_data(bytes(raw[: end + 4]))
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(f"bad response head: {exc}") from None
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):  # 100, 103 come first
                raise httpx.RemoteProtocolError("bad response head")

    async def aclose(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                await conn.close()
        self.idle.clear()


def origin_of(url: httpx.URL) -> Origin:
    return (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))


def _request(method: bytes, target: bytes, headers: Headers) -> tuple[h11.Connection, bytes]:
    """A request head written by h11, and the h11 state that reads its answer."""
    parser = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    try:
        head = parser.send(h11.Request(method=method, target=target, headers=headers))
    except h11.LocalProtocolError:
        # h11's own text repeats the offending value, which may be the access token.
        names = ", ".join(
            name.decode("ascii", "replace")
            for name, value in headers
            if not _plain_header_value(value)
        )
        what = f" (bad value in header {names})" if names else ""
        raise httpx.LocalProtocolError(f"cannot send this request{what}") from None
    assert head is not None
    return parser, head


def _plain_header_value(value: bytes) -> bool:
    """Visible ASCII, spaces and tabs only: what a header value may hold."""
    return all(b == 9 or 32 <= b < 127 for b in value)


def _with_host(headers: Headers, origin: Origin) -> Headers:
    if any(name.lower() == b"host" for name, _ in headers):
        return headers
    return [(b"Host", _authority(origin)), *headers]


def _authority(origin: Origin) -> bytes:
    scheme, host, port = origin
    default = 443 if scheme == "https" else 80
    shown = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return (shown if port == default else f"{shown}:{port}").encode()


def _absolute(origin: Origin, target: bytes) -> bytes:
    return origin[0].encode() + b"://" + _authority(origin) + target
