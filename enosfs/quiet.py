"""Rate-limited logging: a failure that repeats is said once in a while, with a count.

A mount serves thousands of requests a minute; when the backend is down or a disk is
full, each one fails the same way, and a log line per failure would bury the one line
that matters (and fill the disk the log is on).
"""

from __future__ import annotations

import logging
import time


class Quieter:
    """The same text, over and over, is logged once every QUIET seconds with a count of
    the repeats it held back (those go to DEBUG), not once per occurrence."""

    QUIET = 30.0

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.last: dict[str, tuple[float, int]] = {}

    def say(self, level: int, text: str) -> None:
        now = time.monotonic()
        when, hidden = self.last.get(text, (float("-inf"), 0))
        if now - when < self.QUIET:
            self.last[text] = (when, hidden + 1)
            self.log.debug("%s", text)
            return
        self.last[text] = (now, 0)
        if len(self.last) > 1000:
            self.last = {text: (now, 0)}
        self.log.log(level, "%s%s", text, f" (and {hidden} more like it)" if hidden else "")
