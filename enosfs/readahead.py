"""Per-handle access pattern: how far ahead of a reader to fetch.

Pure arithmetic, no I/O, so the policy can be tested on its own. A reader is
sequential when each read starts near where the previous one ended (the kernel may
deliver its parallel reads slightly out of order, hence the tolerance). Read-ahead
starts on the second sequential read, with a small window that doubles each time the
reader reaches the back half of what was fetched, up to a cap. Any jump resets it, so
random readers cause no read-ahead traffic at all.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass
class ReadAhead:
    initial: int = 1 * MiB
    maximum: int = 64 * MiB
    tolerance: int = 1 * MiB
    _next: int = 0
    _streak: int = 0
    _window: int = 0
    _ahead_to: int = 0

    @property
    def window(self) -> int:
        return self._window

    @property
    def sequential(self) -> bool:
        """Has this reader been reading straight through (two reads or more)?"""
        return self._streak >= 2

    def on_read(self, offset: int, size: int, file_size: int) -> tuple[int, int] | None:
        """Record a read; return the byte range [start, end) to prefetch, if any."""
        end = min(offset + size, file_size)
        sequential = abs(offset - self._next) <= self.tolerance
        self._next = max(end, self._next) if sequential else end
        if not sequential:
            self._streak = 0
            self._window = 0
            self._ahead_to = 0
            return None
        self._streak += 1
        if self._streak < 2 or end >= file_size:
            return None
        if self._window == 0:
            self._window = min(self.initial, self.maximum)
        elif end >= self._ahead_to - self._window // 2:
            self._window = min(self._window * 2, self.maximum)
        else:
            return None  # still well inside what was already asked for
        start = max(end, self._ahead_to)
        stop = min(file_size, end + self._window)
        if stop <= start:
            return None
        self._ahead_to = stop
        return (start, stop)
