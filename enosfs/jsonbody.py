"""Reading a JSON answer with a ceiling on its size.

A listing page or a token answer is a few kilobytes; a gateway or proxy gone wrong can
send hundreds of megabytes, which `resp.json()` would buffer whole (and then parse into
several times as much). Reading stops at the ceiling instead.
"""

from __future__ import annotations

import httpx

from enosfs.errors import ProtocolError

MAX_JSON = 16 * 1024 * 1024


async def read_capped(resp: httpx.Response, what: str, limit: int = MAX_JSON) -> bytes:
    """The body of a streamed response, or ProtocolError once it passes `limit` bytes."""
    too_big = ProtocolError(f"{what}: the answer is larger than {limit / 1048576:g} MiB; refused")
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    parts: list[bytes] = []
    n = 0
    async for chunk in resp.aiter_bytes():
        n += len(chunk)
        if n > limit:
            raise too_big
        parts.append(chunk)
    return b"".join(parts)
