"""The lean HTTP/1.1 transport against a raw server on loopback that answers in the
ways a real server may: chunked bodies, bodies until close, 1xx answers first, dropped
idle connections."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio.testing import MockClock

from enosfs.errors import DeadlineError, ProtocolError
from enosfs.priority import speculative
from enosfs.retry import RetryPolicy, as_enosfs_error, retrying
from enosfs.transport import IDLE_EXPIRY, KEPT_FOR_NOW, LeanTransport, _request
from tests.support import free_port
from tests.test_faults import make_cert

BODY = bytes(range(256)) * 4000  # ~1 MB


async def _answer(stream: trio.abc.Stream, head: bytes) -> None:
    path = head.split(b" ", 2)[1]
    if path == b"/chunked":
        parts = [BODY[:1000], BODY[1000:700_000], BODY[700_000:]]
        out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        for p in parts:
            out += f"{len(p):x};ext=1\r\n".encode() + p + b"\r\n"
        out += b"0\r\nX-Trailer: yes\r\n\r\n"
        await stream.send_all(out)
    elif path == b"/early":
        await stream.send_all(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n")
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    elif path == b"/close":
        await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY)
        raise EOFError  # close after the body
    elif path == b"/two-lengths":
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
        )
    elif path == b"/length-and-chunked":
        out = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        await stream.send_all(out + b"5\r\nhello\r\n0\r\n\r\n")
    elif path == b"/keep":
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=30\r\nContent-Length: 2\r\n\r\nok"
        )
    elif path == b"/once":
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        raise EOFError  # the server drops the connection it said it would keep
    else:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)


@asynccontextmanager
async def raw_server(
    tls: ssl.SSLContext | None = None,
    answer: Callable[[trio.abc.Stream, bytes], Awaitable[None]] = _answer,
) -> AsyncIterator[tuple[int, list[int]]]:
    connections: list[int] = []

    async def handler(stream: trio.abc.Stream) -> None:
        connections.append(1)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                await answer(stream, head)
        except (EOFError, trio.BrokenResourceError):
            pass
        finally:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.aclose()

    async with trio.open_nursery() as nursery:
        serve: partial[Any] = (
            partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            if tls is None
            else partial(trio.serve_ssl_over_tcp, handler, 0, tls, host="127.0.0.1")
        )
        listeners = await nursery.start(serve)
        sock = listeners[0].socket if tls is None else listeners[0].transport_listener.socket
        port = sock.getsockname()[1]
        yield port, connections
        nursery.cancel_scope.cancel()


async def test_framings_and_early_answers() -> None:
    async with raw_server() as (port, _), httpx.AsyncClient(transport=LeanTransport()) as c:
        base = f"http://127.0.0.1:{port}"
        assert (await c.get(f"{base}/chunked")).content == BODY
        r = await c.get(f"{base}/early")
        assert (r.status_code, r.content) == (200, b"hello")
        assert (await c.get(f"{base}/close")).content == BODY
        assert (await c.get(f"{base}/plain")).content == BODY


async def test_readinto_fills_caller_buffers() -> None:
    async with raw_server() as (port, _), httpx.AsyncClient(transport=LeanTransport()) as c:
        for path in ("/plain", "/chunked"):
            async with c.stream("GET", f"http://127.0.0.1:{port}{path}") as r:
                readinto = r.extensions["readinto"]
                buf = bytearray(len(BODY) + 10)
                view = memoryview(buf)
                got = 0
                while n := await readinto(view[got:]):
                    got += n
                assert bytes(buf[:got]) == BODY


async def test_connections_are_reused_and_dead_ones_replaced() -> None:
    async with raw_server() as (port, conns), httpx.AsyncClient(transport=LeanTransport()) as c:
        base = f"http://127.0.0.1:{port}"
        for _ in range(5):
            assert (await c.get(f"{base}/plain")).content == BODY
        assert len(conns) == 1
        # The server closes the connection after this answer; the next request finds
        # the pooled connection dead and goes on a new one, without an error.
        assert (await c.get(f"{base}/once")).content == b"ok"
        await trio.sleep(0.05)
        assert (await c.get(f"{base}/plain")).content == BODY
        assert len(conns) == 2


async def test_an_idle_connection_lives_as_long_as_its_server_says(mock_clock: MockClock) -> None:
    """Past IDLE_EXPIRY an idle connection is dropped, unless the server said (Keep-Alive:
    timeout=30) that it keeps it longer: far away, a new one costs a round trip or two."""
    lean = LeanTransport()
    async with raw_server() as (port, conns), httpx.AsyncClient(transport=lean) as c:
        base = f"http://127.0.0.1:{port}"
        assert (await c.get(f"{base}/early")).content == b"hello"  # says nothing
        mock_clock.jump(IDLE_EXPIRY + 1)
        assert (await c.get(f"{base}/keep")).content == b"ok"
        assert lean.connects == 2  # the first was not trusted any more
        mock_clock.jump(IDLE_EXPIRY + 1)  # past 15 s, well within the server's 30
        assert (await c.get(f"{base}/keep")).content == b"ok"
        assert lean.connects == 2 and len(conns) == 2
        mock_clock.jump(30)  # past what the server said
        assert (await c.get(f"{base}/keep")).content == b"ok"
        assert lean.connects == 3


async def test_connections_asked_ahead_open_in_the_background_and_serve_later_calls() -> None:
    """open_ahead: connections for the next round of calls, opened while this one is
    under way; asked again, it counts those idle and on their way, not only the idle."""
    lean = LeanTransport()
    async with raw_server() as (port, conns), httpx.AsyncClient(transport=lean) as c:
        origin = ("http", "127.0.0.1", port)
        lean.open_ahead(origin, 4)
        lean.open_ahead(origin, 4)  # four on their way already
        lean.open_ahead(origin, 2)
        with trio.fail_after(10):
            while len(lean.idle[origin]) < 4:
                await trio.sleep(0.01)
        assert lean.connects == 4
        got: list[bytes] = []

        async def get() -> None:
            got.append((await c.get(f"http://127.0.0.1:{port}/early")).content)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(get)
        assert got == [b"hello"] * 4
        assert lean.connects == 4 and len(conns) == 4
        # Nothing listens here: what cannot be opened is left to the call that needs it.
        nowhere = ("http", "127.0.0.1", free_port())
        lean.open_ahead(nowhere, 2)
        with trio.fail_after(10):
            while lean._opening[nowhere]:
                await trio.sleep(0.01)
        assert not lean.idle[nowhere]


async def test_calls_under_way_count_as_connections_had() -> None:
    """Two calls waiting for their answers hold a connection each: connections for three
    calls are then one more, not three."""
    go = trio.Event()

    async def slow(stream: trio.abc.Stream, head: bytes) -> None:
        await go.wait()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    lean = LeanTransport()
    async with raw_server(answer=slow) as (port, conns), httpx.AsyncClient(transport=lean) as c:
        origin = ("http", "127.0.0.1", port)
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(c.get, f"http://127.0.0.1:{port}/slow")
            with trio.fail_after(10):
                while len(conns) < 2:
                    await trio.sleep(0.01)
            lean.open_ahead(origin, 3)
            with trio.fail_after(10):
                while lean._opening[origin]:
                    await trio.sleep(0.01)
            assert lean.connects == 3 and len(lean.idle[origin]) == 1
            go.set()
        assert len(lean.idle[origin]) == 3 and lean._calls[origin] == 0


async def test_a_burst_as_wide_as_the_pool_keeps_its_connections() -> None:
    """Every connection a burst used waits idle for the next one: a pool that kept
    fewer would open them again, a round trip each far away."""
    lean = LeanTransport(max_connections=40)
    async with raw_server() as (port, conns), httpx.AsyncClient(transport=lean) as c:
        for _ in range(2):
            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(c.get, f"http://127.0.0.1:{port}/early")
        assert lean.connects == 40 and len(conns) == 40


def test_a_header_value_that_cannot_be_sent_is_never_shown() -> None:
    """h11's own complaint repeats the value, which may be the access token."""
    with pytest.raises(httpx.LocalProtocolError) as info:
        _request(b"GET", b"/x", [(b"host", b"h"), (b"apim-accesstoken", b"SECRETTOKEN\n")])
    assert "SECRETTOKEN" not in str(info.value) and "apim-accesstoken" in str(info.value)


async def test_ambiguous_lengths_are_refused() -> None:
    """Two Content-Lengths, or one with chunked: either reading could serve another
    answer's bytes as this one's, so none is served."""
    async with raw_server() as (port, _), httpx.AsyncClient(transport=LeanTransport()) as c:
        for path in ("/two-lengths", "/length-and-chunked"):
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(f"http://127.0.0.1:{port}{path}")
        assert (await c.get(f"http://127.0.0.1:{port}/early")).content == b"hello"


async def test_a_server_that_breaks_http_is_asked_once() -> None:
    """An answer no one can frame safely would come back the same from every attempt:
    the call fails at the first, with one line that says why, not after eight."""
    policy = RetryPolicy(timeout=20, base_delay=0.01, max_delay=0.01, max_attempts=8)
    async with raw_server() as (port, conns), httpx.AsyncClient(transport=LeanTransport()) as c:
        for path in ("/two-lengths", "/length-and-chunked"):
            before = len(conns)
            url = f"http://127.0.0.1:{port}{path}"
            with pytest.raises(ProtocolError) as info:
                await retrying(policy, f"GET {path}", partial(c.get, url))
            assert len(conns) - before == 1, "asked again"
            text = str(info.value)
            assert "\n" not in text and text.startswith(f"GET {path}: ")
            assert "Content-Length" in text


async def test_file_bodies_never_take_the_last_connections() -> None:
    """Slow file bodies hold every connection they may take; an API call still gets
    one at once, and a body past the limit fails with a timeout instead of waiting
    without end."""
    release = trio.Event()
    heads = 0

    async def answer(stream: trio.abc.Stream, head: bytes) -> None:
        nonlocal heads
        if head.split(b" ", 2)[1] != b"/body":
            await _answer(stream, head)
            return
        heads += 1
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nx")
        await release.wait()
        await stream.send_all(b"y")

    lean = LeanTransport(max_connections=8, pool_timeout=1.0)
    bodies = lean.max_connections - lean.reserved
    assert 0 < bodies < lean.max_connections
    outcomes: list[object] = []
    async with raw_server(answer=answer) as (port, _), httpx.AsyncClient(transport=lean) as c:
        origin = ("http", "127.0.0.1", port)

        async def body() -> None:
            try:
                r = await lean.request("GET", origin, b"/body", [])
            except httpx.PoolTimeout as exc:
                outcomes.append(as_enosfs_error(exc, "download"))
                return
            try:
                outcomes.append(await r.aread())
            finally:
                await r.aclose()

        async with trio.open_nursery() as nursery:
            for _ in range(lean.max_connections):
                nursery.start_soon(body)
            with trio.fail_after(10):
                while heads < bodies:
                    await trio.sleep(0.01)
                # An API call (through httpx, as api.py makes them) while bodies stream.
                call = await c.get(f"http://127.0.0.1:{port}/early")
            assert call.content == b"hello"
            with trio.fail_after(10):
                while len(outcomes) < lean.max_connections - bodies:
                    await trio.sleep(0.01)
            assert all(isinstance(o, DeadlineError) for o in outcomes), outcomes
            release.set()
    assert outcomes.count(b"xy") == bodies == heads
    assert lean.in_use == 0


async def test_tls_bodies_are_decrypted_into_the_callers_buffer(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    async with raw_server(server) as (port, conns):
        base = f"https://127.0.0.1:{port}"
        lean = LeanTransport(verify=str(cert))
        async with httpx.AsyncClient(transport=lean) as c:
            for path in ("/plain", "/chunked"):
                async with c.stream("GET", base + path) as r:
                    readinto = r.extensions["readinto"]
                    buf = bytearray(len(BODY))
                    got = 0
                    while n := await readinto(memoryview(buf)[got:]):
                        got += n
                    assert bytes(buf[:got]) == BODY
            assert (await c.get(f"{base}/close")).content == BODY
        assert lean.counts["tls_recv_into"] >= len(BODY) // 16384
        assert len(conns) == 2  # kept alive across the first two

        # The system's trust store does not know this certificate: no connection.
        async with httpx.AsyncClient(transport=LeanTransport()) as c:
            with pytest.raises(httpx.ConnectError, match="certificate"):
                await c.get(f"{base}/plain")


async def test_calls_made_ahead_leave_the_last_idle_connections_to_awaited_ones() -> None:
    """A folder's sizes asked ahead of need must not take the idle connection the
    open's download then needs: far away a new one costs it a round trip."""
    lean = LeanTransport()
    async with raw_server() as (port, conns), httpx.AsyncClient(transport=lean) as c:
        origin = ("http", "127.0.0.1", port)
        url = f"http://127.0.0.1:{port}/early"
        lean.open_ahead(origin, KEPT_FOR_NOW)
        with trio.fail_after(10):
            while len(lean.idle[origin]) < KEPT_FOR_NOW:
                await trio.sleep(0.01)
        with speculative():
            assert (await c.get(url)).content == b"hello"
        assert lean.connects == KEPT_FOR_NOW + 1  # its own; the idle ones left alone
        assert len(lean.idle[origin]) == KEPT_FOR_NOW + 1
        with speculative():  # more idle than are kept: it takes one
            assert (await c.get(url)).content == b"hello"
        assert (await c.get(url)).content == b"hello"  # awaited: takes any idle one
        assert lean.connects == KEPT_FOR_NOW + 1 and len(conns) == KEPT_FOR_NOW + 1
