"""TlsConnection's waits, driven with a stand-in for the ssl socket: OpenSSL may need
to write during a read (a key update, a renegotiation) and to read during a write, and
a connection that waits on the wrong side of the socket hangs until its timeout."""

from __future__ import annotations

import socket
import ssl
from collections import Counter
from collections.abc import Iterator

import pytest

from enosfs.connection import TlsConnection

ORIGIN = ("https", "example.invalid", 443)


class _Scripted:
    """A non-blocking ssl socket's face: each call raises or returns the next scripted
    outcome; fileno() is a real socket's, so trio can wait on it."""

    def __init__(self, real: socket.socket, script: list[BaseException | bytes | int]) -> None:
        self.real = real
        self.script = script
        self.calls = 0

    def fileno(self) -> int:
        return self.real.fileno()

    def _next(self) -> BaseException | bytes | int:
        self.calls += 1
        return self.script.pop(0)

    def recv_into(self, view: memoryview) -> int:
        step = self._next()
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, bytes)
        view[: len(step)] = step
        return len(step)

    def send(self, view: memoryview) -> int:
        step = self._next()
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, int)
        return step


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


async def test_a_read_that_must_write_first_waits_for_writability(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Nothing will arrive to read (the peer sends nothing), but the socket can be
    written: waiting for readability here would end only at the read timeout."""
    mine, _peer = pair
    fake = _Scripted(mine, [ssl.SSLWantWriteError(), b"hello", ssl.SSLWantReadError()])
    conn = TlsConnection(fake, ORIGIN, Counter())  # type: ignore[arg-type]
    buf = bytearray(16)
    n = await conn.receive_into(memoryview(buf), timeout=5)
    assert bytes(buf[:n]) == b"hello"


async def test_a_write_that_must_read_first_waits_for_readability(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The other way round: the send is retried once the socket has bytes to read."""
    mine, peer = pair
    peer.send(b"x")  # readable now
    fake = _Scripted(mine, [ssl.SSLWantReadError(), 5])
    conn = TlsConnection(fake, ORIGIN, Counter())  # type: ignore[arg-type]
    await conn.send_all(b"hello", timeout=5)
    assert fake.calls == 2
