"""Per-handle access pattern: how far ahead of a reader to fetch.

Pure arithmetic, no I/O, so the policy can be tested on its own. A reader is
sequential when each read starts near where the previous one ended (the kernel may
deliver its parallel reads slightly out of order, hence the tolerance). Read-ahead
starts on the second sequential read (or the first, when the read is as large as the
kernel ever sends, which means the application asked for more), with a small window
that grows by twice what the reader reads (so it doubles each time the reader has read
half a window more), up to a cap. Any jump resets it, so small random readers cause no
read-ahead traffic at all.

The window is kept full as the reader moves, topped up a request at a time, and a
request is an eighth of the window (`ranges`): over a far link each range is paced
(one TCP stream gets a fraction of the link), so the link is filled only by several
ranges in flight at every moment, not by a few large ones asked for in bursts each
time the reader crosses half the window.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
# Bytes of small files a folder read-ahead first fetches (FolderReadAhead.for_files_of).
FIRST_WINDOW = 1 * MiB


@dataclass
class ReadAhead:
    initial: int = 1 * MiB
    maximum: int = 64 * MiB
    tolerance: int = 1 * MiB
    large_read: int = 128 * 1024
    ranges: int = 8  # requests a full window is fetched in, so about this many in flight
    growth: int = 2  # bytes the window grows by for each byte read, up to the maximum
    _next: int | None = None  # where a sequential reader reads next
    _streak: int = 0
    _window: int = 0
    _ahead_to: int = 0
    _grown_at: int = 0  # where the reader was when the window last grew

    @property
    def window(self) -> int:
        return self._window

    @property
    def request(self) -> int:
        """Bytes one read-ahead request should carry: an eighth of the window (never
        less than the first window, a block in fs.py), so that a full window is
        several ranges in flight at once and each new one is asked for as soon as
        the reader has made room for it."""
        return max(min(self.initial, self._window), self._window // max(1, self.ranges))

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
        return not self._continues(offset) or self._streak + 1 < 2

    def _continues(self, offset: int) -> bool:
        """Does a read at offset carry on the present run? It does near where the run
        has reached, and anywhere within its window of it: the reads the kernel has
        under way at once (a dozen or so) finish in any order, the more so the more
        ranges are on their way, and one that finishes late is no jump back. Bytes
        within the window are fetched already, so nothing is wasted either way."""
        if self._next is None:
            return False
        return abs(offset - self._next) <= max(self.tolerance, self._window)

    def on_read(self, offset: int, size: int, file_size: int) -> tuple[int, int] | None:
        """Record a read; return the byte range [start, end) to prefetch, if any."""
        end = min(offset + size, file_size)
        if self._continues(offset):
            self._next = max(end, self._next or 0)
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
            self._grown_at = end
        elif end > self._grown_at:
            # Grown smoothly, by `growth` bytes for each byte read: doubled at once, it
            # would ask for a whole window in one burst, whose ranges share the link
            # and all arrive late, the first one (the reader's next) with the rest.
            more = self.growth * (end - self._grown_at)
            self._window = min(self._window + more, self.maximum)
            self._grown_at = end
        start = max(end, self._ahead_to)
        stop = min(file_size, end + self._window)
        # Topped up a whole request at a time (the file's tail however small): one
        # small request per read would pay a round trip for little.
        if stop <= start or (stop - start < self.request and stop < file_size):
            return None
        self._ahead_to = stop
        return (start, stop)

    def clipped(self, at: int) -> None:
        """Only bytes before `at` of the last range are on their way (the memory budget
        had no room for the rest): ask for the rest again on a later read, rather than
        leave it to the reader's misses, a block and a round trip each."""
        self._ahead_to = min(self._ahead_to, at)


@dataclass
class FolderReadAhead:
    """Read-ahead across files: for a reader that opens a folder's files one after
    another in listing order (cp -r, tar, rsync), fetch the next small files before they
    are opened, so the per-file round trip overlaps instead of adding up.

    Starts after two opens in a row, with a window of a few files that doubles while
    the pattern holds; any other order resets it. The window is topped up each time
    the reader is half way through it, so about half of it is fetched a round trip:
    at most 64 files, 4 MiB of 64 KiB files, about what a 125 MB/s link brings in a
    40 ms round trip (at 32, a cold `cp -r` of 500 such files moved 16 a round trip,
    a third of the link). The reader's byte budget (cache.read_ahead) bounds it too.
    """

    initial: int = 4
    maximum: int = 128
    _last: int | None = None
    _streak: int = 0
    _window: int = 0
    _ahead_to: int = 0

    @classmethod
    def for_files_of(cls, size: int | None) -> FolderReadAhead:
        """A pattern whose first window holds about FIRST_WINDOW bytes of files the size
        of the one just opened (at least `initial` files): as a sequential reader's
        window starts near a megabyte, not at four 64 KiB files, which far away spends
        two more round trips growing to what the link takes."""
        if not size:
            return cls()
        return cls(initial=max(cls.initial, min(cls.maximum // 4, FIRST_WINDOW // size)))

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
