"""How much a random miss may fetch: what the link brings in a small share of a round trip.

A random read waits for one round trip whatever it asks for, plus the time its bytes
take to come. Bytes beyond the read are a bet that a later read falls in them (saving
that read a whole round trip), and this reader pays for the bet now, in transfer time.
The bandwidth-delay product, what the link brings in a round trip, is the most a
request can carry before costing a round trip more, but fetching it doubles the
miss's wait: on a thin link (2 MB/s, 40 ms away: 80 KB) it halves the reads a second,
for a gain only a reader with locality sees. So a miss fetches what the link brings in
a sixteenth of its round trip, and never more than 5 ms of it: the miss waits at most
about 6 % longer than for its own bytes, which pays off if one miss in sixteen is
saved, and even the farthest link adds only milliseconds. A fast link still fetches a
lot (125 MB/s at 40 ms: 256 KiB), a thin one about the read itself (2 MB/s: a page).

Below a piece, spans are whole pages (the kernel reads whole pages anyway); from a
piece on, whole pieces. The read itself is fetched whatever the span says.

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
# The share of its round trip a miss may spend on bytes beyond the read, and the most
# time it may spend on them however far the link (see above).
SHARE = 1 / 16
MOST_EXTRA = 0.005
PAGE = 4096


class LinkSpeed:
    """Recent round trips and throughputs; the span a random miss should fetch."""

    def __init__(self, piece: int, limit: int, default: int, page: int = PAGE) -> None:
        self.piece = piece  # spans from a piece on are whole multiples of this
        self.page = page  # and smaller ones of this
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
        """Bytes a random miss fetches: what the link brings in a SHARE of the round
        trip (at most MOST_EXTRA seconds), rounded down to whole pieces from a piece
        on and to whole pages below (so never more than that); at least a page, at
        most the limit."""
        rtt, bandwidth = self.rtt, self.bandwidth
        if rtt is None or bandwidth is None:
            want = self.default
        else:
            want = int(bandwidth * min(rtt * SHARE, MOST_EXTRA))
        unit = self.piece if want >= self.piece else self.page
        return max(self.page, min(want // unit * unit, self.limit))

    def stats(self) -> dict[str, Any]:
        rtt, bandwidth = self.rtt, self.bandwidth
        return {
            "rtt_ms": None if rtt is None else round(rtt * 1000, 3),
            "bytes_per_s": None if bandwidth is None else round(bandwidth),
            "random_fetch_bytes": self.span(),
        }
