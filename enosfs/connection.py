"""One HTTP connection's bytes: sent whole, received into the caller's buffer.

Two kinds, one interface. Plain TCP reads with a trio socket's recv_into. TLS reads
with a stdlib `ssl.SSLSocket`, non-blocking, whose recv_into decrypts straight into
the caller's buffer: trio.SSLStream decrypts through memory BIOs and hands out new
bytes objects, copies that held a TLS download on loopback to about a fifth of curl's
speed. The socket is waited on with trio (wait_readable / wait_writable), so a reader
that gives up is cancelled like any trio task and leaves nothing blocked behind.

Errors are httpx's own exception types, so retries and resumes treat every path alike.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import trio

MAX_LINE = 64 * 1024
LINE_READ = 4096  # small: chunk data read with a size line is copied out again


class ProtocolViolation(httpx.RemoteProtocolError):
    """The server broke HTTP itself (a head that cannot be parsed or framed safely, a
    bad chunk line), as opposed to a connection cut short: it would answer another
    attempt the same way, so retry.py fails the call at once instead of retrying."""


class Connection:
    """Bytes read past what was consumed wait in `buffer` and are served first."""

    def __init__(self, origin: tuple[str, str, int]) -> None:
        self.origin = origin
        self.buffer = bytearray()
        self.idle_since = 0.0

    async def send_all(self, data: bytes, timeout: float) -> None:
        try:
            with trio.fail_after(timeout):
                await self._send_all(data)
        except trio.TooSlowError:
            raise httpx.WriteTimeout("timed out sending the request") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.WriteError(f"connection broken: {exc}") from None

    async def receive(self, max_bytes: int, timeout: float) -> bytes:
        """Up to max_bytes (buffered ones first); b"" once the peer has closed."""
        if self.buffer:
            out = bytes(self.buffer[:max_bytes])
            del self.buffer[:max_bytes]
            return out
        buf = bytearray(max_bytes)
        n = await self.receive_into(memoryview(buf), timeout)
        return bytes(buf[:n])

    async def receive_into(self, view: memoryview, timeout: float) -> int:
        """Fill the start of view; 0 once the peer has closed."""
        if self.buffer:
            n = min(len(view), len(self.buffer))
            view[:n] = self.buffer[:n]
            del self.buffer[:n]
            return n
        return await self._socket_into(view, timeout)

    async def line(self, timeout: float) -> bytes:
        """The next CRLF-ended line, without its CRLF (chunked framing)."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > MAX_LINE:
                raise ProtocolViolation("chunked framing line too long")
            more = bytearray(LINE_READ)
            n = await self._socket_into(memoryview(more), timeout)
            if not n:
                raise httpx.RemoteProtocolError("peer closed the connection in chunked framing")
            self.buffer += more[:n]
        out = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return out

    async def _socket_into(self, view: memoryview, timeout: float) -> int:
        try:
            with trio.fail_after(timeout):
                return await self._receive_into(view)
        except trio.TooSlowError:
            raise httpx.ReadTimeout("timed out reading the response") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"connection broken: {exc}") from None

    async def _send_all(self, data: bytes) -> None:
        raise NotImplementedError

    async def _receive_into(self, view: memoryview) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class PlainConnection(Connection):
    def __init__(self, stream: trio.SocketStream, origin: tuple[str, str, int]) -> None:
        super().__init__(origin)
        self.stream = stream

    async def _send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _receive_into(self, view: memoryview) -> int:
        return int(await self.stream.socket.recv_into(view, len(view)))

    async def close(self) -> None:
        with contextlib.suppress(Exception), trio.CancelScope(shield=True):
            await self.stream.aclose()

    def detach(self) -> socket.socket:
        """The stdlib socket under this connection, which is spent (for TLS on it)."""
        if self.buffer:
            raise httpx.RemoteProtocolError("bytes before the TLS handshake")
        fd = self.stream.socket.detach()
        return socket.socket(fileno=fd)


class TlsConnection(Connection):
    """TLS on a non-blocking stdlib socket; `counts["tls_recv_into"]` counts the reads
    that decrypt straight into a caller's buffer."""

    def __init__(
        self, sock: ssl.SSLSocket, origin: tuple[str, str, int], counts: Counter[str]
    ) -> None:
        super().__init__(origin)
        self.sock = sock
        self.counts = counts
        self.eof = False

    @classmethod
    async def handshake(
        cls,
        plain: PlainConnection,
        context: ssl.SSLContext,
        host: str,
        origin: tuple[str, str, int],
        counts: Counter[str],
    ) -> TlsConnection:
        """TLS to host over a connected socket (direct, or a proxy's tunnel); the
        certificate is verified as the context says, for host."""
        raw = plain.detach()
        raw.setblocking(False)
        try:
            sock = context.wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        conn = cls(sock, origin, counts)
        try:
            await conn._retry(sock.do_handshake)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _retry(self, op: Callable[[], int | None]) -> int:
        """Run a non-blocking SSL operation, waiting on the socket as OpenSSL asks."""
        while True:
            try:
                return int(op() or 0)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.sock)

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            # A send OpenSSL could not finish is retried with the same bytes.
            n = await self._retry(partial(self.sock.send, view))
            view = view[n:]

    async def _receive_into(self, view: memoryview) -> int:
        while not self.eof:
            n, wait = self._drain(view)
            if n:
                return n
            if not self.eof:
                await wait(self.sock)
        return 0

    def _drain(self, view: memoryview) -> tuple[int, Callable[[socket.socket], Awaitable[None]]]:
        """Decrypt what has arrived into view, record by record, without waiting: one
        call per wake-up rather than one per 16 KiB record. Also says what to wait for
        before the next try: a read can need to write first (a TLS 1.3 key update, or
        a renegotiation, answered while the send buffer is full), and waiting for
        bytes that the server only sends after ours would hang until the timeout."""
        n = 0
        wait: Callable[[socket.socket], Awaitable[None]] = trio.lowlevel.wait_readable
        while n < len(view):
            try:
                got = self.sock.recv_into(view[n:])
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                wait = trio.lowlevel.wait_writable
                break
            self.counts["tls_recv_into"] += 1
            if got == 0:
                self.eof = True
                break
            n += got
        return n, wait

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
