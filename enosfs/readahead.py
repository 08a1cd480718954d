"""Per-handle access pattern: how far ahead of a reader to fetch.

Pure arithmetic, no I/O, so the policy can be tested on its own. A reader is
sequential when each read starts near where the previous one ended (the kernel may
deliver its parallel reads slightly out of order, hence the tolerance). Read-ahead
starts on the second sequential read (or the first, when the read is as large as the
kernel ever sends, which means the application asked for more), with a small window
that doubles each time the reader reaches the back half of what was fetched, up to a
cap. Any jump resets it, so small random readers cause no read-ahead traffic at all.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass
class ReadAhead:
    initial: int = 1 * MiB
    maximum: int = 64 * MiB
    tolerance: int = 1 * MiB
    large_read: int = 128 * 1024
    _next: int | None = None  # where a sequential reader reads next
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

    def random(self, offset: int, size: int) -> bool:
        """Would this read, once recorded, leave the reader without a sequential
        pattern? Asked before the read is served, so that a random reader's miss
        fetches about what it reads (blocks.py) and a sequential one whole blocks."""
        if size >= self.large_read:
            return False
        continues = self._next is not None and abs(offset - self._next) <= self.tolerance
        return not continues or self._streak + 1 < 2

    def on_read(self, offset: int, size: int, file_size: int) -> tuple[int, int] | None:
        """Record a read; return the byte range [start, end) to prefetch, if any."""
        end = min(offset + size, file_size)
        if self._next is not None and abs(offset - self._next) <= self.tolerance:
            self._next = max(end, self._next)
            self._streak += 1
        else:
            # A jump: a new run starts here, already established if the read is large.
            self._next = end
            self._window = 0
            self._ahead_to = 0
            self._streak = 0
        if size >= self.large_read:
            self._streak = max(self._streak, 2)
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


@dataclass
class FolderReadAhead:
    """Read-ahead across files: for a reader that opens a folder's files one after
    another in listing order (cp -r, tar, rsync), fetch the next small files before they
    are opened, so the per-file round trip overlaps instead of adding up.

    Starts after two opens in a row, with a window of a few files that doubles while
    the pattern holds; any other order resets it.
    """

    initial: int = 4
    maximum: int = 32
    _last: int | None = None
    _streak: int = 0
    _window: int = 0
    _ahead_to: int = 0

    def on_open(self, index: int, count: int) -> tuple[int, int] | None:
        """Record that the file at `index` of `count` was opened; return the indices
        [start, stop) of the files to prefetch, if any."""
        if self._last is not None and index == self._last + 1:
            self._streak += 1
        elif index != self._last:
            self._streak = 0
            self._window = 0
            self._ahead_to = 0
        self._last = index
        if self._streak < 1 or index + 1 >= count:
            return None
        if self._window == 0:
            self._window = self.initial
        elif index + 1 >= self._ahead_to - self._window // 2:
            self._window = min(self._window * 2, self.maximum)
        else:
            return None
        start = max(index + 1, self._ahead_to)
        stop = min(count, index + 1 + self._window)
        if stop <= start:
            return None
        self._ahead_to = stop
        return (start, stop)
