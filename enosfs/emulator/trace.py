"""When each API request arrived and when its answer was ready: the emulator's record
of which requests a client sent one after another and which at once.

A client tuned on loopback can serialise round trips nobody notices; under a network
profile (network.py) each costs `rtt`, and this record shows the series (a request that
arrives only after the previous one was answered) and the overlap (`peak`: the most
requests waiting for their answers at once). Kept small and in memory; the admin API
shows it (GET /__emulator__/trace) and `stats/reset` clears it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

KEEP = 10_000


@dataclass
class Span:
    kind: str
    arrived: float
    answered: float | None = None  # the answer's head may go (round trip and faults played)


class Trace:
    def __init__(self, keep: int = KEEP) -> None:
        self.spans: deque[Span] = deque(maxlen=keep)
        self.open = 0
        self.peak = 0
        self.epoch = time.monotonic()

    def arrived(self, kind: str) -> Span:
        span = Span(kind, time.monotonic())
        self.spans.append(span)
        self.open += 1
        self.peak = max(self.peak, self.open)
        return span

    def answered(self, span: Span) -> None:
        if span.answered is None:
            span.answered = time.monotonic()
            self.open -= 1

    def reset(self) -> None:
        self.spans.clear()
        self.peak = self.open
        self.epoch = time.monotonic()

    def describe(self) -> dict[str, Any]:
        """Spans in milliseconds since the last reset, in arrival order."""

        def ms(t: float | None) -> float | None:
            return None if t is None else round((t - self.epoch) * 1000, 3)

        return {
            "peak": self.peak,
            "spans": [
                {"kind": s.kind, "arrived_ms": ms(s.arrived), "answered_ms": ms(s.answered)}
                for s in self.spans
            ],
        }
