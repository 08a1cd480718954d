"""A network profile: the emulator played as if EnOS were far away, behind a thin link.

`--network rtt=40ms,connect=40ms,conn=25MB/s,link=125MB/s` (every part optional):

- `rtt`: a round trip added to every API request, before the answer's head.
- `connect`: what opening a connection costs (a TCP handshake is one round trip, a TLS
  one more), paid once per connection, before its first request is read. Defaults
  to `rtt`; `connect=0` turns it off.
- `conn`: bytes a second for each download body (the cap of one TCP stream).
- `link`: bytes a second shared by every download body at once (the site's link).

Loopback answers in microseconds, so a client tuned there serialises round trips
without anyone noticing; this makes the cost visible, and testable as a lower bound.
The profile is one mutable object shared by the app and the connection protocol, so
the admin API can change it at run time.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from enosfs.emulator.pacing import Pacer
from enosfs.errors import ConfigError
from enosfs.values import parse_seconds, parse_size


class NetworkError(ValueError):
    """A network profile that does not make sense."""


@dataclass
class NetworkProfile:
    rtt: float = 0.0
    connect: float = 0.0
    conn: float = 0.0  # bytes a second per body; 0: no cap
    link: float = 0.0  # bytes a second for all bodies together; 0: no cap
    _link_pacer: Pacer | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_spec(cls, spec: str) -> NetworkProfile:
        """'rtt=40ms,conn=25MB/s' -> NetworkProfile; NetworkError names a bad part."""
        values: dict[str, float] = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep:
                raise NetworkError(f"network option {item!r} is not key=value")
            try:
                if key in ("rtt", "connect"):
                    values[key] = parse_seconds(value, f"network {key}")
                elif key in ("conn", "link"):
                    if not value.endswith("/s"):
                        raise NetworkError(f"network {key} is a rate such as 25MB/s, not {value!r}")
                    values[key] = float(parse_size(value[:-2], f"network {key}"))
                else:
                    raise NetworkError(
                        f"unknown network option {key!r} (options: rtt, connect, conn, link)"
                    )
            except ConfigError as exc:
                raise NetworkError(str(exc)) from None
        rtt = values.get("rtt", 0.0)
        return cls(
            rtt=rtt,
            connect=values.get("connect", rtt),
            conn=values.get("conn", 0.0),
            link=values.get("link", 0.0),
        )

    def replace_with(self, other: NetworkProfile) -> None:
        """Take another profile's values in place: the protocol holds this object."""
        self.rtt, self.connect, self.conn, self.link = (
            other.rtt,
            other.connect,
            other.conn,
            other.link,
        )
        self._link_pacer = None

    def describe(self) -> dict[str, Any]:
        return {"rtt": self.rtt, "connect": self.connect, "conn": self.conn, "link": self.link}

    def pacers(self) -> list[Pacer]:
        """The pacers a new download body goes through: its own (per connection) and the
        link's, shared with every other body.

        No burst: each chunk leaves when its last byte would have crossed the link, so
        that n bytes cost n / rate from the first. A burst of one chunk (a twentieth of
        a second's worth) would hand a small fetch its bytes free, and a thin link
        would reward fetching 100 KB for a 4 KiB read as if it cost nothing."""
        out = []
        if self.conn > 0:
            out.append(Pacer(self.conn, 0))
        if self.link > 0:
            if self._link_pacer is None or self._link_pacer.rate != self.link:
                self._link_pacer = Pacer(self.link, 0)
            out.append(self._link_pacer)
        return out


def distant_protocol(profile: NetworkProfile, counts: Counter[str]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, with the profile's connect cost paid by each connection:
    nothing it sends is read until `connect` seconds after it was accepted, which a
    client sees as a connection that took that long to open. The ASGI app never learns
    of connections, so this is also where they are counted (`connections`)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class DistantProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            counts["connections"] += 1
            if profile.connect > 0:
                transport.pause_reading()
                self.loop.call_later(profile.connect, _resume, transport)

    return DistantProtocol


def _resume(transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.resume_reading()
