"""Bandwidth caps for the bodies the emulator sends: one body's, or a whole link's.

One mechanism serves the `bandwidth` fault (a pace for each body), the network
profile's cap per connection (a body is the only thing a keep-alive HTTP/1.1
connection sends at a time) and its cap for the whole link (one pacer shared by every
body, so that ten parallel ranges share the link as they would on a real one).

A pacer is a token bucket kept as a theoretical arrival time (GCRA): sending n bytes
moves that time n/rate on; a sender waits until it is no more than one burst ahead of
the clock. With a burst of one chunk, a lone body sends its first chunk at once and
every next one a chunk's time later: a trickle of small chunks, never a silence.
"""

from __future__ import annotations

import time


def chunk_for(rate: float, largest: int) -> int:
    """The chunk a body paced at `rate` is sent in: about twenty a second, so that a slow
    body trickles (a client must tell a trickle from a stall), within [64, largest]."""
    return largest if not rate else max(64, min(largest, int(rate / 20)))


class Pacer:
    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0:
            raise ValueError("a pacer needs a rate above zero")
        self.rate = rate
        self.allowance = burst / rate  # seconds a sender may run ahead
        self.arrival = 0.0

    def reserve(self, n: int, now: float | None = None) -> float:
        """Book n bytes; return how many seconds to wait before sending them."""
        now = time.monotonic() if now is None else now
        self.arrival = max(self.arrival, now) + n / self.rate
        return max(0.0, self.arrival - self.allowance - now)
