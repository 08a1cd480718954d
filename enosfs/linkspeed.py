"""How much one request may fetch for free: the link's bandwidth times its round trip.

A random read waits for one round trip whatever it asks for, plus the time its bytes
take to come. Asking for bandwidth x round-trip time (the bandwidth-delay product)
at most doubles that wait, while the next read nearby may find its bytes already
here; asking for more costs whole round trips more. So a fast, far link fetches a
large span per random miss, a thin one (a modem at a wind farm) little more than the
read itself.

Both numbers come from the fetches the cache makes anyway: the round trip is the
least time to first byte of the recent ones (the least, since a busy server, a new
connection or a retry only ever add to it), the bandwidth the median throughput of
recent bodies long enough to time. Pure arithmetic over numbers the caller measures,
so it is tested without a clock or a network.
"""

from __future__ import annotations

from collections import deque
from statistics import median
from typing import Any

SAMPLES = 16  # recent fetches an estimate is taken over
# A body timed over less than this says more about the timer and the scheduler than
# about the link: on loopback a whole 64 KiB piece lands in one read.
MIN_TIMED = 0.005


class LinkSpeed:
    """Recent round trips and throughputs; the span a random miss should fetch."""

    def __init__(self, piece: int, limit: int, default: int) -> None:
        self.piece = piece  # spans are whole multiples of this
        self.limit = limit  # and never more than this (a block)
        self.default = default  # until both numbers are known
        self._firsts: deque[float] = deque(maxlen=SAMPLES)
        self._rates: deque[float] = deque(maxlen=SAMPLES)

    def first_byte(self, seconds: float) -> None:
        """A request's first body byte came this long after it was sent."""
        if seconds >= 0:
            self._firsts.append(seconds)

    def body(self, nbytes: int, seconds: float) -> None:
        """A body brought nbytes in seconds, counted from its first byte on (so the
        round trip is not in it)."""
        if seconds >= MIN_TIMED and nbytes > 0:
            self._rates.append(nbytes / seconds)

    @property
    def rtt(self) -> float | None:
        return min(self._firsts) if self._firsts else None

    @property
    def bandwidth(self) -> float | None:
        """Bytes a second one body gets."""
        return median(self._rates) if self._rates else None

    def span(self) -> int:
        """Bytes a random miss fetches: the bandwidth-delay product rounded down to
        whole pieces (so never more than it), at least one piece, at most the limit."""
        rtt, bandwidth = self.rtt, self.bandwidth
        if rtt is None or bandwidth is None:
            want = self.default
        else:
            want = int(rtt * bandwidth) // self.piece * self.piece
        return max(self.piece, min(want, self.limit))

    def stats(self) -> dict[str, Any]:
        rtt, bandwidth = self.rtt, self.bandwidth
        return {
            "rtt_ms": None if rtt is None else round(rtt * 1000, 3),
            "bytes_per_s": None if bandwidth is None else round(bandwidth),
            "random_fetch_bytes": self.span(),
        }
