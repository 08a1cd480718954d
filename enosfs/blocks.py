"""The block cache: fixed-size blocks of file content in one byte-bounded LRU.

A block is downloaded once however many readers want it (single flight): the first
miss starts a fetch task in the mount's nursery and later readers wait on the same
flight. A fetch covers a run of consecutive missing blocks with one ranged request and
hands each block out the moment its last byte lands. Fetch tasks do not belong to the
reader that caused them, so a reader that gives up (Ctrl-C) does not cancel a download
others are waiting for.

Keys carry the file's version (size and digest), so bytes of two versions never mix. A
body cut short is resumed from the byte it reached; a server that ignores Range is
handled by cutting its whole-file stream into blocks as it arrives.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field

import httpx
import trio
from cachetools import LRUCache

from enosfs.api import Body, EnosClient, FileRef
from enosfs.errors import EnosfsError, ProtocolError, TransportError

log = logging.getLogger(__name__)

MAX_RESUMES = 3
MAX_FREE_BUFFERS = 64


@dataclass(frozen=True)
class CachedFile:
    """What the cache needs of a file: how to fetch it and which version it is."""

    ref: FileRef
    size: int
    version: Hashable

    @property
    def key(self) -> tuple[str, Hashable]:
        return (self.ref.uri, self.version)


@dataclass
class Flight:
    """One block on its way; readers wait on `done`."""

    done: trio.Event = field(default_factory=trio.Event)
    data: bytearray | None = None
    error: BaseException | None = None


class BlockCache:
    def __init__(
        self,
        client: EnosClient,
        nursery: trio.Nursery,
        *,
        block_size: int = 1024 * 1024,
        budget: int = 512 * 1024 * 1024,
        max_request: int = 8 * 1024 * 1024,
        whole_file_limit: int = 4 * 1024 * 1024,
    ) -> None:
        self.client = client
        self.nursery = nursery
        self.block_size = block_size
        self.max_request = max(block_size, max_request)
        self.whole_file_limit = whole_file_limit
        self.lru: LRUCache[tuple[object, ...], bytearray] = LRUCache(maxsize=budget, getsizeof=len)
        self.flights: dict[tuple[object, ...], Flight] = {}
        self.stats: Counter[str] = Counter()
        self._free: list[bytearray] = []
        self._released: list[bytearray] = []

    # -- reading -------------------------------------------------------------------------

    async def read(
        self, f: CachedFile, offset: int, size: int, *, consume: bool = False
    ) -> bytes | memoryview:
        """Exactly the bytes [offset, offset+size) of f, fewer only at end of file.

        A read inside one block is a view of the cached block: no copy on the way to the
        kernel. A read across blocks is joined. With consume (a sequential reader, whose
        bytes now sit in the kernel's page cache), blocks read to their end leave the
        cache and their buffers are reused for the blocks still to come.
        """
        self._recycle()
        if offset >= f.size or size <= 0:
            return b""
        end = min(offset + size, f.size)
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        if f.size <= self.whole_file_limit:
            self._ensure(f, 0, (f.size - 1) // bs)
        else:
            self._ensure(f, first, last)
        parts: list[memoryview] = []
        for index in range(first, last + 1):
            block = await self._block(f, index)
            lo = offset - index * bs if index == first else 0
            hi = end - index * bs if index == last else bs
            if hi > len(block):
                raise ProtocolError(f"download {f.ref.uri}: block {index} is short")
            parts.append(memoryview(block)[lo:hi])
            if consume and hi == len(block):
                self._release(f, index)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _release(self, f: CachedFile, index: int) -> None:
        block = self.lru.pop(self._key(f, index), None)
        if block is not None and len(block) == self.block_size:
            self._released.append(block)

    def _recycle(self) -> None:
        """Move released buffers that nobody holds any more to the free list.

        Runs at the start of the next read, when pyfuse3 has sent the previous reply and
        let go of its view. A buffer still referenced anywhere (a view, a reader waiting
        on its flight) has a higher reference count and is left to the garbage collector
        instead: reusing it could change bytes someone is about to send.
        """
        if not self._released:
            return
        for block in self._released:
            # References: the list, the loop variable, getrefcount's argument.
            if sys.getrefcount(block) <= 3 and len(self._free) < MAX_FREE_BUFFERS:
                self._free.append(block)
        self._released.clear()

    def _buffer(self, size: int) -> bytearray:
        if size == self.block_size and self._free:
            self.stats["reused_buffers"] += 1
            return self._free.pop()
        return bytearray(size)

    def prefetch(self, f: CachedFile, start: int, stop: int) -> None:
        """Start fetching bytes [start, stop) in the background; nobody waits for them."""
        if stop <= start or start >= f.size:
            return
        self._ensure(f, start // self.block_size, (min(stop, f.size) - 1) // self.block_size)

    def drop(self, f: CachedFile) -> None:
        """Forget every cached block of this version of f."""
        for k in [k for k in self.lru if k[:2] == f.key]:
            del self.lru[k]

    # -- internals -----------------------------------------------------------------------

    def _key(self, f: CachedFile, index: int) -> tuple[object, ...]:
        return (*f.key, index)

    async def _block(self, f: CachedFile, index: int) -> bytearray:
        key = self._key(f, index)
        data = self.lru.get(key)
        if data is not None:
            self.stats["hits"] += 1
            return data
        flight = self.flights.get(key)
        if flight is None:
            # Evicted between _ensure and now (a tiny budget): fetch it again.
            self._ensure(f, index, index)
            flight = self.flights[key]
        self.stats["waits"] += 1
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        assert flight.data is not None
        return flight.data

    def _missing(self, f: CachedFile, index: int) -> bool:
        key = self._key(f, index)
        return key not in self.flights and key not in self.lru

    def _ensure(self, f: CachedFile, first: int, last: int) -> None:
        """Start fetches for the blocks in [first, last] that nobody has or is getting."""
        blocks_per_request = max(1, self.max_request // self.block_size)
        index = first
        while index <= last:
            if not self._missing(f, index):
                index += 1
                continue
            run_start = index
            while (
                index <= last and self._missing(f, index) and index - run_start < blocks_per_request
            ):
                index += 1
            owned = {i: self._claim(f, i) for i in range(run_start, index)}
            self.nursery.start_soon(self._fetch, f, run_start, index - 1, owned)

    def _claim(self, f: CachedFile, index: int) -> Flight:
        flight = Flight()
        self.flights[self._key(f, index)] = flight
        return flight

    def _deliver(
        self, f: CachedFile, index: int, data: bytearray, owned: dict[int, Flight]
    ) -> None:
        flight = owned.pop(index)
        self.lru[self._key(f, index)] = data
        flight.data = data
        self.flights.pop(self._key(f, index), None)
        flight.done.set()

    def _fail(self, f: CachedFile, owned: dict[int, Flight], error: BaseException) -> None:
        for index, flight in owned.items():
            self.flights.pop(self._key(f, index), None)
            flight.error = error
            flight.done.set()
        owned.clear()

    async def _fetch(self, f: CachedFile, first: int, last: int, owned: dict[int, Flight]) -> None:
        """Download blocks first..last, resuming a cut body from the byte it reached.

        Bytes go from the socket straight into each block's own buffer; a block is
        handed to its readers the moment its last byte lands.
        """
        bs = self.block_size
        pos = first * bs
        end = min(f.size, (last + 1) * bs)  # exclusive; a block boundary or EOF
        block: bytearray | None = None  # the block holding pos, while partly filled
        resumes = 0
        self.stats["fetches"] += 1
        try:
            while pos < end:
                try:
                    async with self.client.open_download(f.ref, pos, end - 1) as body:
                        if body.total is not None and body.total != f.size:
                            raise ProtocolError(
                                f"download {f.ref.uri}: server has {body.total} bytes, "
                                f"expected {f.size}: the file changed"
                            )
                        if not body.ranged:
                            pos, end = self._adopt_whole_body(f, pos, block is not None, owned)
                        if await _skip(body, pos - body.start):
                            while pos < end:
                                index = pos // bs
                                start = index * bs
                                size = min(bs, f.size - start)
                                if block is None:
                                    block = self._buffer(size)
                                n = await body.readinto(memoryview(block)[pos - start : size])
                                if n == 0:
                                    break
                                pos += n
                                self.stats["bytes"] += n
                                if pos == start + size:
                                    if index in owned:
                                        self._deliver(f, index, block, owned)
                                    block = None
                except httpx.TransportError as exc:
                    log.debug("download of %s interrupted: %r", f.ref.uri, exc)
                if pos < end:
                    resumes += 1
                    self.stats["resumes"] += 1
                    if resumes > MAX_RESUMES:
                        raise TransportError(
                            f"download {f.ref.uri}: body ended early at byte {pos} of {end}, "
                            f"{MAX_RESUMES + 1} times"
                        )
                    log.info("download of %s cut at byte %d; resuming", f.ref.uri, pos)
        except EnosfsError as exc:
            self._fail(f, owned, exc)
        except Exception as exc:
            # A bug, not a server fault: say so once, and never leave readers hanging.
            log.exception("unexpected error downloading %s", f.ref.uri)
            self._fail(f, owned, TransportError(f"download {f.ref.uri}: {type(exc).__name__}"))
        finally:
            self._fail(f, owned, TransportError(f"download {f.ref.uri}: incomplete"))

    def _adopt_whole_body(
        self, f: CachedFile, pos: int, partial: bool, owned: dict[int, Flight]
    ) -> tuple[int, int]:
        """The server ignored Range and sends the whole file: take every block it brings.

        Claims the missing blocks nobody else is fetching, so concurrent readers wait on
        this stream instead of starting more whole-file downloads. Returns the new
        (pos, end) to read between.
        """
        bs = self.block_size
        lowest = pos // bs if partial else 0
        for i in range(lowest, (f.size - 1) // bs + 1):
            if i not in owned and self._missing(f, i):
                owned[i] = self._claim(f, i)
        if not owned:
            return pos, pos
        if not partial:
            pos = min(owned) * bs
        return pos, min(f.size, (max(owned) + 1) * bs)


async def _skip(body: Body, count: int) -> bool:
    """Read and drop count bytes (a server that ignored Range); False if the body ended."""
    if count <= 0:
        return True
    scratch = memoryview(bytearray(min(count, 1024 * 1024)))
    while count > 0:
        n = await body.readinto(scratch[: min(count, len(scratch))])
        if n == 0:
            return False
        count -= n
    return True
