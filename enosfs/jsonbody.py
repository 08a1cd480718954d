"""Reading a JSON answer with a ceiling on its size.

A listing page or a token answer is a few kilobytes; a gateway or proxy gone wrong can
send hundreds of megabytes, which `resp.json()` would buffer whole (and then parse into
several times as much). Reading stops at the ceiling instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx

from enosfs.errors import ProtocolError

MAX_JSON = 16 * 1024 * 1024


async def read_capped(resp: httpx.Response, what: str, limit: int = MAX_JSON) -> bytes:
    """The body of a streamed response, or ProtocolError once it passes `limit` bytes."""
    too_big = ProtocolError(f"{what}: the answer is larger than {limit / 1048576:g} MiB; refused")
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    readinto = resp.extensions.get("readinto")
    if readinto is not None and length.isdigit() and "content-encoding" not in resp.headers:
        return await _read_exactly(readinto, int(length))
    parts: list[bytes] = []
    n = 0
    async for chunk in resp.aiter_bytes():
        n += len(chunk)
        if n > limit:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)


async def _read_exactly(readinto: Callable[[memoryview], Awaitable[int]], length: int) -> bytes:
    """A body of known length read into one buffer of that size: the lean transport's
    stream would allocate a megabyte for each few-hundred-byte answer and copy it out
    again, a cost every one of a folder's getFileInfo calls paid."""
    buf = bytearray(length)
    view = memoryview(buf)
    got = 0
    while got < length:
        n = await readinto(view[got:])
        if n == 0:
            raise ProtocolError(f"connection closed {length - got} bytes before the answer's end")
        got += n
    view.release()
    return bytes(buf)
