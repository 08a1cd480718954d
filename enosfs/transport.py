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
import re
import ssl
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import Any

import h11
import httpx
import trio

from enosfs.connection import Connection, PlainConnection, ProtocolViolation, TlsConnection
from enosfs.priority import urgent
from enosfs.proxies import Proxies, Proxy, ProxyAuthRequired

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024
HEAD_READ = 4096
READ_SIZE = 1024 * 1024
IDLE_EXPIRY = 15.0  # seconds an idle connection is trusted to still be open
# Trusted this much less than a server's own `Keep-Alive: timeout=N`: the request that
# takes it must reach the server before the server lets it go.
KEEP_ALIVE_MARGIN = 1.0
_KEEP_ALIVE_TIMEOUT = re.compile(rb"(?:^|[,;\s])timeout\s*=\s*(\d+)", re.IGNORECASE)
# Connections that file bodies never take, kept for API calls and token renewals.
RESERVED_FOR_CALLS = 4
# Idle connections a call made ahead of need leaves for one somebody waits for: a
# folder's 499 other sizes, asked the moment its first is, would otherwise take every
# idle connection as it frees, and the open's download would pay for a new one (a
# round trip far away, two with TLS) while the sizes it does not need go first.
KEPT_FOR_NOW = 2

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
        bulk: bool,
    ) -> None:
        self.transport = transport
        self.conn = conn
        self.bulk = bulk  # holds a file body's slot too
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
                raise ProtocolViolation("chunk not followed by CRLF")
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
            raise ProtocolViolation(f"bad chunk size line {line[:40]!r}") from None
        if size < 0:
            raise ProtocolViolation("negative chunk size")
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
            self.transport.give_slot(self.bulk)
            self.transport._call_done(self.conn.origin, self.bulk)


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        verify: ssl.SSLContext | str | bool = True,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        max_connections: int = 32,
        proxies: Proxies | None = None,
        pool_timeout: float | None = None,
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
        # Seconds each origin says it keeps an idle connection (Keep-Alive: timeout=N).
        self.keep_alive: dict[Origin, float] = {}
        self.counts: Counter[str] = Counter()
        self._opening: Counter[Origin] = Counter()  # connections opened ahead, on their way
        self._calls: Counter[Origin] = Counter()  # API requests under way, each on a connection
        # One slot per connection in use; a response body holds its slot until closed.
        # A file body streams for as long as its reader takes, an API call or a token
        # renewal for a round trip: bodies also hold a slot of their own, of which
        # there are `reserved` fewer, so that 32 slow downloads cannot make a listing
        # or a renewal wait for one of them to end. No wait is without end either.
        self.max_connections = max_connections
        self.slots = trio.Semaphore(max_connections)
        self.reserved = (
            min(RESERVED_FOR_CALLS, max(1, max_connections // 4)) if max_connections > 1 else 0
        )
        self.body_slots = trio.Semaphore(max_connections - self.reserved)
        self.pool_timeout = read_timeout if pool_timeout is None else pool_timeout

    @property
    def in_use(self) -> int:
        return self.max_connections - self.slots.value

    async def take_slot(self, bulk: bool) -> None:
        """A connection slot (and, for a file body, a body slot first), or PoolTimeout
        once pool_timeout has passed: retry.py counts that as a timeout like any other."""
        with trio.move_on_after(self.pool_timeout):
            if not bulk:
                await self.slots.acquire()
                return
            await self.body_slots.acquire()
            try:
                await self.slots.acquire()
                return
            except BaseException:
                self.body_slots.release()
                raise
        kind = "file body" if bulk else "request"
        raise httpx.PoolTimeout(
            f"no connection free for a {kind} within {self.pool_timeout:g}s "
            f"({self.in_use} of {self.max_connections} in use)"
        )

    def give_slot(self, bulk: bool) -> None:
        self.slots.release()
        if bulk:
            self.body_slots.release()

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
        # As many as may be in use at once: a burst wider than what is kept idle
        # (a folder's read-ahead, a round of sizes) closes connections the next burst
        # opens again, a round trip each far away.
        if len(idle) < self.max_connections:
            conn.idle_since = trio.current_time()
            idle.append(conn)
        else:
            trio.lowlevel.spawn_system_task(conn.close)

    def _pooled(self, origin: Origin, keep: int = 0) -> Connection | None:
        """The most recently used idle connection, if any is young enough to trust:
        servers close idle connections after some seconds (nginx 75, uvicorn 5, many
        gateways 15), and a dead one costs a failed attempt. How long is what the
        server said in its Keep-Alive header, where it did; IDLE_EXPIRY otherwise. A
        connection dropped for nothing costs the next request a new one: a round trip
        far away, two with TLS. The last `keep` idle ones are passed by."""
        idle = self.idle[origin]
        now = trio.current_time()
        trusted = self.idle_expiry(origin)
        while len(idle) > keep:
            conn = idle.pop()
            if now - conn.idle_since < trusted:
                return conn
            trio.lowlevel.spawn_system_task(conn.close)
        return None

    def idle_expiry(self, origin: Origin) -> float:
        """Seconds an idle connection to origin is trusted to be still open."""
        said = self.keep_alive.get(origin)
        return IDLE_EXPIRY if said is None else max(0.0, said - KEEP_ALIVE_MARGIN)

    def open_ahead(self, origin: Origin, count: int) -> None:
        """See that `count` API calls to origin will find a connection: those under way
        hold one, and idle ones and ones on their way count too; the rest are opened in
        the background. For calls queued behind a bound that grows each round
        (throttle.py): opened now, while this round's answers travel, they are ready
        when the next round goes; opened by the calls themselves, every round of the
        bound's growth would cost a connection's round trip more."""
        # Not the idle ones kept for calls someone waits for: calls made ahead pass
        # them by (_pooled), so they do not count as found.
        idle = max(0, len(self.idle[origin]) - KEPT_FOR_NOW)
        have = idle + self._opening[origin] + self._calls[origin]
        for _ in range(min(count, self.max_connections) - have):
            self._opening[origin] += 1
            trio.lowlevel.spawn_system_task(self._open_spare, origin)

    async def _open_spare(self, origin: Origin) -> None:
        try:
            conn = await self._connect(origin, self.proxies.for_origin(*origin))
        except Exception as exc:  # left to the request that needs one, which says why
            log.debug("no connection opened ahead to %s: %s", origin[1], exc)
            return
        finally:
            self._opening[origin] -= 1
        self.release(conn)

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
        # 407, or 401 as tinyproxy answers a wrong password: a CONNECT is the proxy's
        # alone to answer, so either status is its own.
        if answer.status_code in (401, 407):
            raise ProxyAuthRequired(proxy)
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
        # API calls and token requests: brief, so never kept waiting by file bodies.
        response = await self.request(
            request.method, origin_of(url), url.raw_path, request.headers.raw, content, bulk=False
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
        *,
        bulk: bool = True,
    ) -> httpx.Response:
        """One exchange without an httpx.Request: the hot path of downloads, where
        httpx's request and client machinery cost as much as the I/O itself. `bulk`:
        a file body, which may stream for long (see take_slot)."""
        proxy = self.proxies.for_origin(*origin)
        headers = _with_host(headers, origin)
        if proxy is not None and origin[0] == "http":
            # Through an http proxy, an http request names its whole URL.
            target = _absolute(origin, target)
            if proxy.authorization is not None:
                headers = [*headers, (b"Proxy-Authorization", proxy.authorization)]
        if not bulk:
            self._calls[origin] += 1  # until its body is closed (see open_ahead)
        try:
            await self.take_slot(bulk)
        except BaseException:
            self._call_done(origin, bulk)
            raise
        try:
            # A pooled connection the server has since closed fails at once: try anew.
            for attempt in range(2):
                # The second attempt is on a new connection, never another pooled one.
                conn = None
                if attempt == 0:
                    conn = self._pooled(origin, keep=0 if urgent() else KEPT_FOR_NOW)
                fresh = conn is None
                if conn is None:
                    conn = await self._connect(origin, proxy)
                try:
                    response = await self._exchange(conn, method, target, headers, content, bulk)
                except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as exc:
                    await conn.close()
                    if fresh or attempt == 1 or isinstance(exc, ProtocolViolation):
                        raise
                    continue
                except BaseException:
                    await conn.close()
                    raise
                if response.status_code == 407 and proxy is not None and origin[0] == "http":
                    await conn.close()  # its body unread; the slot goes below
                    raise ProxyAuthRequired(proxy)
                return response
            raise AssertionError("unreachable")
        except BaseException:
            self.give_slot(bulk)
            self._call_done(origin, bulk)
            raise

    def _call_done(self, origin: Origin, bulk: bool) -> None:
        if not bulk:
            self._calls[origin] -= 1

    async def _exchange(
        self,
        conn: Connection,
        method: str,
        target: bytes,
        headers: Headers,
        content: bytes,
        bulk: bool,
    ) -> httpx.Response:
        parser, head = _request(method.encode(), target, headers)
        await conn.send_all(head + content, self.read_timeout)
        answer = await self._response_head(conn, parser, self.read_timeout)
        status = answer.status_code
        fields = answer.headers  # names lower-cased by h11
        names = {name for name, _ in fields}
        if b"content-length" in names and b"transfer-encoding" in names:
            raise ProtocolViolation("Content-Length together with Transfer-Encoding")
        connection = b",".join(v for n, v in fields if n == b"connection").lower()
        reusable = answer.http_version == b"1.1" and b"close" not in connection
        keep_alive = _keep_alive_timeout(fields)
        if keep_alive is not None:
            self.keep_alive[conn.origin] = keep_alive
        if method == "HEAD" or status in (204, 304):
            framing, length = "length", 0
        elif b"transfer-encoding" in names:  # h11 lets only "chunked" through
            framing, length = "chunked", None
        elif b"content-length" in names:  # one value: h11 refuses conflicting ones
            framing, length = "length", int(next(v for n, v in fields if n == b"content-length"))
        else:
            framing, length, reusable = "close", None, False
        body = _Body(self, conn, framing, length, reusable, bulk)
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
                    raise ProtocolViolation("response head too large")
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
                raise ProtocolViolation(f"bad response head: {exc}") from None
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):  # 100, 103 come first
                raise ProtocolViolation("bad response head")

    async def aclose(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                await conn.close()
        self.idle.clear()


def _keep_alive_timeout(fields: Iterable[tuple[bytes, bytes]]) -> float | None:
    """The `timeout=N` of a Keep-Alive header: seconds the server keeps an idle
    connection open."""
    for name, value in fields:
        if name == b"keep-alive":
            m = _KEEP_ALIVE_TIMEOUT.search(value)
            if m is not None:
                return float(int(m.group(1)))
    return None


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
