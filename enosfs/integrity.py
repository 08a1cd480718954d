"""Whole-file digests of large files, computed over the bytes one open file is served.

EnOS gives one digest per file (md5, or a firmware's sign), so bytes can be checked
only when a file is read whole. Files up to the whole-file limit are fetched whole and
checked before a reader sees a byte (blocks.py). A larger file is checked as it is read
from its start to its end, as cp, md5sum, tar or a flasher read it: the bytes each read
returns are hashed in file order (in a worker thread: hashlib and zlib let go of the
GIL, so hashing runs beside the trio thread), and the read that completes the reading
waits for the result. A mismatch fails that read, which is where a whole-file reader
learns that what it got is wrong.

What is hashed is exactly what this open file was served, not what the cache holds, so
a block fetched twice, or evicted and fetched again, cannot slip past. For that to hold,
every byte the reader gets must pass through read(): fs.py starts each such open with
the kernel's page cache of the file dropped, and gives a second open of the same file
direct I/O while the first is open, so neither is served pages the other put there.

A CRC-32 of each cache block is taken from the same bytes. Once the whole matched, those
CRCs are known to be right, and from then on every block of the file, fetched for any
reader, random ones included, is checked against its CRC before it is served.

A reader that skips part of the file, or reads a part again (the kernel re-reading a
page it evicted), makes no claim: random and partial reads of a file no whole reading
has matched yet cannot be checked, since there is no digest for a part.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from typing import Any

import trio

log = logging.getLogger(__name__)

Chunk = bytes | memoryview


class Reading:
    """The bytes one open file was served, hashed in file order as they come."""

    def __init__(
        self, algorithm: str, want: str, size: int, window: int, block_size: int
    ) -> None:
        self.hasher = hashlib.new(algorithm)
        # A CRC-32 of each cache block too: once the whole matches, they vouch for each
        # block on its own, so later fetches of any part can be checked (blocks.py).
        self.blocks = _BlockCrcs(block_size)
        self.algorithm = algorithm
        self.want = want.lower()
        self.size = size
        self.window = window  # how far past `pos` a read may end and still be held
        self.pos = 0  # bytes [0, pos) are queued for hashing
        self.held: dict[int, Chunk] = {}  # served ahead of their turn, by offset
        self.held_bytes = 0
        self.broken = False  # a gap or a re-read: this reading makes no claim
        self.queue: list[Chunk] = []
        self.queued = 0
        self._progress = trio.Event()
        self.hashing = False
        self.idle = trio.Event()
        self.idle.set()
        self.ok: bool | None = None

    def served(self, offset: int, data: Chunk, nursery: trio.Nursery) -> None:
        """A read of this open file returned data at offset."""
        if self.broken or self.pos == self.size or not len(data):
            return  # no claim, or every byte is in: the verdict is about those
        if offset > self.pos:
            # The kernel's parallel reads land slightly out of order: hold a few. A read
            # further ahead is a reader that skipped (or started past the beginning).
            if offset + len(data) - self.pos > self.window or offset in self.held:
                self._break(f"held {self.held_bytes} bytes, next {offset} at {self.pos}")
            else:
                self.held[offset] = data
                self.held_bytes += len(data)
            return
        if offset < self.pos:
            # Served again: which copy the reader kept is not known.
            self._break(f"{offset} served again at {self.pos}")
            return
        self._queue(data, nursery)
        while self.pos in self.held:
            nxt = self.held.pop(self.pos)
            self.held_bytes -= len(nxt)
            self._queue(nxt, nursery)
        if any(o < self.pos for o in self.held):
            # Held bytes that overlap what is hashed: a second copy of a page.
            self._break("overlapping reads")

    @property
    def complete(self) -> bool:
        """Every byte of the file was served, in order, and queued for hashing."""
        return not self.broken and self.pos == self.size and not self.held

    @property
    def backlog(self) -> int:
        """Bytes served and not hashed yet (they pin their cache blocks)."""
        return self.queued

    async def hashed_some(self) -> None:
        """Wait until the hasher has taken another batch (or stopped)."""
        if self.hashing:
            await self._progress.wait()

    async def result(self) -> bool | None:
        """Does what was served match the digest? None: this reading makes no claim
        after all (it broke, or its hashing failed)."""
        await self.idle.wait()
        if self.broken or not self.complete:
            return None
        if self.ok is None:
            self.ok = self.hasher.hexdigest() == self.want
        return self.ok

    def block_crcs(self) -> list[int]:
        """The CRC-32 of each cache block of what was served; for a reading that matched."""
        assert self.ok
        return self.blocks.finish()

    def _break(self, why: str) -> None:
        if not self.broken:
            log.debug("a reading of a %d-byte file makes no claim: %s", self.size, why)
        self.broken = True
        self.held.clear()
        self.held_bytes = 0

    def _queue(self, data: Chunk, nursery: trio.Nursery) -> None:
        self.pos += len(data)
        self.queued += len(data)
        self.queue.append(data)
        if not self.hashing:
            self.hashing = True
            self.idle = trio.Event()
            nursery.start_soon(self._hash)

    async def _hash(self) -> None:
        try:
            while self.queue:
                batch, self.queue = self.queue, []
                await trio.to_thread.run_sync(_update, self.hasher, self.blocks, batch)
                self.queued -= sum(len(b) for b in batch)
                self._progress.set()
                self._progress = trio.Event()
        except Exception:
            log.exception("hashing a reading failed; it makes no claim")
            self.broken = True
            self.queue.clear()
            self.queued = 0
        finally:
            self.hashing = False
            self._progress.set()
            self.idle.set()


class _BlockCrcs:
    """CRC-32s of consecutive fixed-size blocks of a stream fed in order."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.crcs: list[int] = []
        self._crc = 0
        self._filled = 0

    def update(self, data: Chunk) -> None:
        view = memoryview(data)
        while len(view):
            n = min(len(view), self.block_size - self._filled)
            self._crc = zlib.crc32(view[:n], self._crc)
            self._filled += n
            view = view[n:]
            if self._filled == self.block_size:
                self.crcs.append(self._crc)
                self._crc = self._filled = 0

    def finish(self) -> list[int]:
        """The CRCs, the last (partial) block's included."""
        if self._filled:
            self.crcs.append(self._crc)
            self._crc = self._filled = 0
        return self.crcs


def _update(hasher: Any, blocks: _BlockCrcs, batch: list[Chunk]) -> None:
    for data in batch:
        hasher.update(data)
        blocks.update(data)
