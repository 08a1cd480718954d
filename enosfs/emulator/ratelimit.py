"""A gateway's rate limit: at most N API calls a second per app, HTTP 429 beyond.

`--rate-limit 50/s` (or `3000/min`). The window slides: at most N calls admitted in
any second, so a client that bursts is told so at once, and one that keeps to the
limit is never refused. Refused calls do not count towards the window (they reached no
service). Calls are told apart by the app their access token was issued to; the
token service itself is not limited, as the gateway's is set apart from the APIs.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque

_SPEC = re.compile(r"\s*([0-9]+)\s*(?:/\s*(s|sec|second|m|min|minute))?\s*")


class RateLimitError(ValueError):
    """A rate-limit specification that does not make sense."""


class RateLimit:
    def __init__(self, calls: int, window: float = 1.0) -> None:
        if calls < 1 or window <= 0:
            raise RateLimitError("a rate limit needs at least one call in a window above zero")
        self.calls = calls
        self.window = window
        self.admitted: dict[str, deque[float]] = {}
        # Every call of an app, refused ones too, and the most seen in any window: what
        # "the gateway saw at most N a second" means, measured where it happens.
        self.seen: dict[str, deque[float]] = {}
        self.peak_seen = 0

    @classmethod
    def from_spec(cls, spec: str) -> RateLimit:
        """'50/s' -> 50 calls a second; '3000/min' -> 3000 a minute."""
        m = _SPEC.fullmatch(spec)
        if not m:
            raise RateLimitError(f"a rate limit is N/s or N/min, not {spec!r}")
        window = 60.0 if (m.group(2) or "s").startswith("m") else 1.0
        return cls(int(m.group(1)), window)

    def describe(self) -> str:
        return f"{self.calls}/{'s' if self.window == 1.0 else 'min'}"

    def admit(self, app: str, now: float | None = None) -> float | None:
        """None if the call may go on, else the seconds until the window lets one in."""
        now = time.monotonic() if now is None else now
        calls = _slid(self.seen.setdefault(app, deque()), now, self.window)
        calls.append(now)
        self.peak_seen = max(self.peak_seen, len(calls))
        admitted = _slid(self.admitted.setdefault(app, deque()), now, self.window)
        if len(admitted) >= self.calls:
            return admitted[0] + self.window - now
        admitted.append(now)
        return None

    def reset_peak(self) -> None:
        self.seen.clear()
        self.peak_seen = 0


def _slid(times: deque[float], now: float, window: float) -> deque[float]:
    """The times still inside the window that ends now."""
    while times and times[0] <= now - window:
        times.popleft()
    return times


def retry_after(wait: float) -> str:
    """Retry-After in whole seconds, as HTTP has it (delta-seconds), never 0: a client
    told 0 would come straight back."""
    return str(max(1, math.ceil(wait)))
