"""The block cache: fixed-size blocks of file content in one byte-bounded LRU.

A block is downloaded once however many readers want it (single flight): the first
miss starts a fetch task in the mount's nursery and later readers wait on the same
flight. Fetch tasks do not belong to the reader that caused them, so a reader that gives
up (Ctrl-C) does not cancel a download others are waiting for.

Bytes go from the socket straight into the block's buffer, and a reader is served as
soon as the bytes it asked for have landed, not when its whole block has. A read-ahead
fetch covers a run of consecutive blocks with one ranged request. A small read in the
middle of a block that nobody has asked for yet fetches from (just before) the read's
offset to the block's end first, and the block's head with a second request, so a
random 4 KiB read waits for one short transfer, not for half a block.

A random reader (readahead.py says it has no sequential pattern) does not fetch whole
blocks at all: its miss fetches from its read's first page on, grown to what the link
delivers in a small share of a round trip (linkspeed.py: whole 64 KiB pieces on a fast
link, a few pages on a thin one), and the block is filled in parts. A block partly
filled rests in the LRU as its flight, buffer allocated whole and counted whole; a
later read of its filled part is a hit, of another part a fetch of just that
part, and a sequential reader that reaches it fetches the rest. Files whose blocks are
checked (a small file against its digest, a file a whole reading matched against each
block's CRC) are still fetched in whole blocks, so nothing checked today goes
unchecked; only whole blocks go to the disk cache.

Keys carry the file's version (size, and its digest or ETag), and every body's size and
ETag are checked against the version they are fetched for, so bytes of two versions
never mix as long as the server says when a file changed (a new size, digest or ETag).
A body cut short is resumed from the byte it reached; a server that ignores Range is
handled by cutting its whole-file stream into blocks as it arrives.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import zlib
from collections import Counter, OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from cachetools import LRUCache

from enosfs.api import FileMeta, FileRef
from enosfs.diskcache import DiskCache, block_key
from enosfs.errors import DeadlineError, EnosfsError, FileChanged, IntegrityError, TransportError
from enosfs.linkspeed import LinkSpeed
from enosfs.quiet import Quieter
from enosfs.source import Download, Source

if TYPE_CHECKING:
    from enosfs.changes import Changes

log = logging.getLogger(__name__)
_quiet = Quieter(log)

MAX_RESUMES = 3
MAX_FREE_BUFFERS = 64
MAX_CONSUMED = 4096  # blocks partly read by sequential readers, counted (_consume)
# A block whose fetch just failed fails again at once for this long, rather than
# costing each retry (the kernel's included) a whole deadline: a down backend gives
# readers a prompt error, not a storm of slow ones.
FAILURE_MEMORY = 1.0
WAIT_GRACE = 0.75
# A file whose bytes arrived this recently is being fetched: its readers wait on.
LIVE = 1.0
# The least time a fetch's first bytes are judged over (Progress.alive).
FIRST_LOOK = 0.25
MAX_GOOD_FILES = 4096
# A block that fails its CRC is fetched again this many times before the read fails:
# one corrupted body spoils every block it carries (a sequential range is up to 8 MiB),
# and one more copy alone failed the soak's 20 %-corrupt phase 170-270 times in 20 s.
MAX_REFETCHES = 3
SPLIT_ALIGN = 64 * 1024  # a split fetch starts at a multiple of this within the block
# A random reader's miss fetches whole pieces of this size on a fast link, whole pages
# on a thin one (linkspeed.py).
PIECE = SPLIT_ALIGN
# A random miss fetches this much until the link's round trip and bandwidth are known.
FIRST_RANDOM_FETCH = 128 * 1024
PAGE = 4096


def _free_refcount() -> int:
    """sys.getrefcount of a buffer held only by a list being looped over, measured in
    the same shape as BlockCache._recycle's loop."""
    probe = [bytearray(1)]
    for block in probe:
        return sys.getrefcount(block)
    return 0


_FREE_REFS = _free_refcount()


@dataclass(frozen=True)
class CachedFile:
    """What the cache needs of a file: how to fetch it, which version it is, and the
    digest its bytes can be checked against (if EnOS gave one)."""

    ref: FileRef
    size: int
    version: Hashable
    digest: tuple[str, str] | None = None

    @classmethod
    def of(cls, ref: FileRef, meta: FileMeta) -> CachedFile:
        assert meta.size is not None
        return cls(ref, meta.size, meta.version, meta.digest)

    @property
    def key(self) -> tuple[str, Hashable]:
        return (self.ref.uri, self.version)


@dataclass
class Progress:
    """How one fetch is doing: how fast its bytes came over the last second or so, and
    how many of its bodies were dropped as too slow. Readers waiting on its blocks judge
    it by this."""

    at: float = float("-inf")  # its last bytes
    slow_drops: int = 0
    rate: float = float("inf")  # bytes a second over the last whole window
    window_at: float = float("-inf")
    window_bytes: int = 0

    def got(self, n: int, now: float) -> None:
        self.at = now
        if now - self.window_at >= LIVE:
            if self.window_at > float("-inf"):
                self.rate = self.window_bytes / (now - self.window_at)
            self.window_at, self.window_bytes = now, 0
        self.window_bytes += n

    def dropped(self) -> None:
        self.slow_drops += 1
        self.at = float("-inf")

    def alive(self, now: float, min_speed: int) -> bool:
        """Bytes are coming right now, at min_speed at least: a trickle is not
        "coming", nor is a fetch that has brought nothing yet (the reader's own deadline
        covers its first bytes). Before a whole window is measured, the bytes so far
        are judged over at least FIRST_LOOK: a fetch that just started trickling (a
        resume, a second fetch of the block) must not buy its reader another second."""
        if now - self.at >= LIVE:
            return False
        rate = self.rate
        if rate == float("inf"):
            rate = self.window_bytes / max(now - self.window_at, FIRST_LOOK)
        return rate >= min_speed


@dataclass
class Flight:
    """One block on its way, filled by one fetch or several; it knows which byte ranges
    of the block have landed and which its fetches will bring, and wakes each reader
    once its own range has. A random reader's block may stay partly filled: then it
    rests in the LRU as this flight, no fetch under way."""

    size: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytearray | None = None
    error: BaseException | None = None
    buffer: bytearray | None = None
    spans: list[tuple[int, int]] = field(default_factory=list)  # landed, merged, sorted
    asked: list[tuple[int, int]] = field(default_factory=list)  # what its fetches bring
    fetchers: int = 0  # fetch tasks that will write into it
    # Its bytes are checked when the block is whole (a file a reading matched), so no
    # reader may have any of them before then.
    hold: bool = False
    feeds: list[Progress] = field(default_factory=list)  # the fetches filling it
    refetches: int = 0  # fetched again after failing its check (MAX_REFETCHES)

    def alive(self, now: float, min_speed: int) -> bool:
        """Are bytes for this block coming right now, fast enough to count?"""
        return any(p.alive(now, min_speed) for p in self.feeds)

    @property
    def slow_drops(self) -> int:
        return sum(p.slow_drops for p in self.feeds)
    waiters: list[tuple[int, int, trio.Event]] = field(default_factory=list)

    def covered(self, lo: int, hi: int) -> bool:
        return any(a <= lo and hi <= b for a, b in self.spans)

    def gaps(self, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
        """The parts of [lo, hi) that neither landed nor are asked for by a fetch: what
        a reader of them must fetch (single flight per byte, not only per block)."""
        hi = self.size if hi is None else hi
        out = []
        pos = lo
        for a, b in sorted([*self.spans, *self.asked]):
            if a >= hi:
                break
            if b <= pos:
                continue
            if a > pos:
                out.append((pos, a))
            pos = b
        if pos < hi:
            out.append((pos, hi))
        return out

    def free_after(self, pos: int) -> int:
        """Where the first byte from pos on that landed or is asked for lies (the
        block's size if none): how far a fetch from pos may grow without fetching a
        byte twice."""
        taken = [a for a, b in [*self.spans, *self.asked] if b > pos]
        return max(pos, min(taken, default=self.size))

    @property
    def complete(self) -> bool:
        return self.covered(0, self.size)

    def landed(self, lo: int, hi: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.spans, (lo, hi)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.spans = merged
        if self.waiters and not self.hold:
            still = []
            for w in self.waiters:
                if self.covered(w[0], w[1]):
                    w[2].set()
                else:
                    still.append(w)
            self.waiters = still

    def finish(self) -> None:
        self.done.set()
        for _, _, event in self.waiters:
            event.set()
        self.waiters = []

    async def wait_for(self, lo: int, hi: int) -> bytearray:
        """The block's buffer once bytes [lo, hi) are in it (or an error)."""
        if not self.done.is_set() and (
            self.hold or self.buffer is None or not self.covered(lo, hi)
        ):
            event = trio.Event()
            self.waiters.append((lo, hi, event))
            await event.wait()
        if self.error is not None:
            raise self.error.with_traceback(None)
        buffer = self.data if self.data is not None else self.buffer
        assert buffer is not None
        return buffer


class BlockCache:
    def __init__(
        self,
        client: Source,
        nursery: trio.Nursery,
        *,
        block_size: int = 1024 * 1024,
        budget: int = 512 * 1024 * 1024,
        max_request: int = 8 * 1024 * 1024,
        whole_file_limit: int = 4 * 1024 * 1024,
        disk: DiskCache | None = None,
        min_speed: int = 0,
        speed_time: float = 10.0,
    ) -> None:
        self.client = client
        self.nursery = nursery
        self.disk = disk
        self.block_size = block_size
        self.max_request = max(block_size, max_request)
        self.whole_file_limit = whole_file_limit
        # A reader waits this long for its bytes, then fails (ETIMEDOUT) and the blocks
        # it waited for fail fast for FAILURE_MEMORY: the kernel retries a failed read
        # page by page, and each retry must not wait a whole deadline again. A little
        # past the deadline, inside the second a FUSE call is given on top of it: a
        # stall is noticed when the read timeout (the deadline) ends, and the resume
        # that follows gets its chance.
        self.wait_limit = client.policy.timeout + WAIT_GRACE
        # A body slower than min_speed bytes/s over speed_time seconds is dropped and
        # resumed on a new connection, as curl's --speed-limit does: a trickle is not
        # silence, so the read timeout alone would never catch it.
        self.min_speed = min_speed
        self.speed_time = min(speed_time, client.policy.timeout)
        # One budget for all block memory: blocks on their way from read-ahead, spare
        # buffers, and the LRU get the rest. Reads a reader waits for are never held
        # back, so the budget can be overrun by what readers wait on (and by a server
        # that ignores Range, whose whole-file stream is kept as it comes).
        self.budget = budget
        self.prefetch_cap = max(4 * block_size, budget // 4)
        self.free_cap = min(MAX_FREE_BUFFERS, max(1, budget // 8 // block_size))
        lru_size = max(block_size, budget - self.prefetch_cap - self.free_cap * block_size)
        # Whole blocks, and blocks partly filled by random readers (their flights, at
        # rest), each counted as its whole buffer.
        self.lru: LRUCache[tuple[object, ...], bytearray | Flight] = LRUCache(
            maxsize=lru_size, getsizeof=_held
        )
        self.link = LinkSpeed(PIECE, block_size, FIRST_RANDOM_FETCH, PAGE)
        self.inflight = 0  # bytes of blocks claimed and not yet delivered or failed
        self.etags: dict[tuple[str, Hashable], str] = {}
        # Per file version a whole reading matched: the CRC-32 of each of its blocks.
        self.good: OrderedDict[tuple[str, Hashable], list[int]] = OrderedDict()
        # Per file version a reading just matched: set once its cached blocks are checked.
        self.scanning: dict[tuple[str, Hashable], trio.Event] = {}
        # Per file version: open files whose whole reading is being checked (fs.py).
        self.readings: Counter[tuple[str, Hashable]] = Counter()
        self.failures: dict[tuple[object, ...], tuple[float, BaseException]] = {}
        # Told when a download shows a file changed under us (the namespace re-checks).
        self.changes: Changes | None = None
        self.flights: dict[tuple[object, ...], Flight] = {}
        self.counts: Counter[str] = Counter()
        self._free: list[bytearray] = []
        self._released: list[bytearray] = []
        # Per block a sequential reader is reading: the bytes it was served so far.
        self._consumed: dict[tuple[object, ...], int] = {}

    def stats(self) -> dict[str, Any]:
        """Its part of /.enosfs/stats: the memory tier of the cache, and the blocks on
        their way."""
        c = self.counts
        return {
            "bytes_downloaded": c["bytes"],
            "cache": {
                "memory": {
                    "hits": c["hits"],
                    "misses": c["waits"],
                    "bytes": self.lru.currsize,
                    "capacity": self.lru.maxsize,
                    "blocks": len(self.lru),
                },
                "verified_files": c["verified_files"],
                "integrity_failures": c["integrity_failures"],
                "bad_blocks": c["bad_blocks"],
                "files_changed": c["changed"],
                "resumes": c["resumes"],
                "read_ahead_clipped": c["readahead_clipped"],
                "split_fetches": c["split_fetches"],
                "failed_fast": c["failed_fast"],
                "reader_timeouts": c["reader_timeouts"],
                "slow_bodies": c["slow_bodies"],
                "reused_buffers": c["reused_buffers"],
                "random_reads": {
                    # Reads of random readers that had to fetch, the requests they made
                    # (one a block they touch), and what those brought.
                    "misses": c["random_misses"],
                    "fetches": c["random_fetches"],
                    "bytes_fetched": c["random_bytes"],
                    "partial_blocks": sum(isinstance(v, Flight) for v in self.lru.values()),
                    **self.link.stats(),
                },
            },
            "in_flight": {"blocks": len(self.flights), "bytes": self.inflight},
        }

    # -- reading -------------------------------------------------------------------------

    async def read(
        self,
        f: CachedFile,
        offset: int,
        size: int,
        *,
        consume: bool = False,
        wait_limit: float | None = None,
        no_wait: bool = False,
        random_access: bool = False,
    ) -> bytes | memoryview:
        """Exactly the bytes [offset, offset+size) of f, fewer only at end of file.

        Waits for bytes that do not come at most wait_limit seconds (default: the
        deadline plus a grace), longer only while they are still coming; with no_wait,
        not at all (DeadlineError): the caller's system call already waited its fill.
        With random_access (a reader with no sequential pattern), a miss fetches only
        the pages or pieces around the read, not whole blocks (see the module's doc).

        A read inside one block is a view of the cached block: no copy on the way to the
        kernel. A read across blocks is joined. With consume (a sequential reader, whose
        bytes now sit in the kernel's page cache), blocks it has read all of leave the
        cache and their buffers are reused for the blocks still to come.
        """
        self._recycle()
        if offset >= f.size or size <= 0:
            return b""
        if self.scanning and (scan := self.scanning.get(f.key)) is not None:
            await scan.wait()
        end = min(offset + size, f.size)
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        spans = [
            (
                index,
                offset - index * bs if index == first else 0,
                end - index * bs if index == last else min(bs, f.size - index * bs),
            )
            for index in range(first, last + 1)
        ]
        if self.failures:
            self._fail_fast(f, spans)
        if no_wait and not all(self._available(f, i, lo, hi) for i, lo, hi in spans):
            self.counts["failed_fast"] += 1
            raise DeadlineError(f"download {f.ref.uri}: the bytes are still not here")
        # Blocks checked before they are served are fetched whole.
        pieces = random_access and f.size > self.whole_file_limit and not self.known_good(f)
        if f.size <= self.whole_file_limit:
            self._ensure_whole(f)
        elif pieces:
            missed = [self._ensure_pieces(f, i, lo, hi) for i, lo, hi in spans]
            self.counts["random_misses"] += any(missed)
        else:
            self._ensure(f, first, last, hint=offset)

        parts: list[memoryview] = []
        limit = self.wait_limit if wait_limit is None else min(wait_limit, self.wait_limit)
        deadline = trio.current_time() + limit
        for index, lo, hi in spans:
            flight = self.flights.get(self._key(f, index))
            drops = flight.slow_drops if flight is not None else 0
            while True:
                with trio.move_on_at(deadline) as scope:
                    block = await self._block(f, index, lo, hi, pieces)
                if not scope.cancelled_caught:
                    break
                # Out of time; but while the bytes of this very block keep coming at a
                # speed not judged too slow, they are not "bytes that do not come".
                now = trio.current_time()
                flight = self.flights.get(self._key(f, index))
                if flight is not None and (
                    not flight.alive(now, self.min_speed) or flight.slow_drops != drops
                ):
                    raise self._timed_out(f, spans)
                deadline = now + LIVE
            parts.append(memoryview(block)[lo:hi])
            if consume:
                self._consume(f, index, len(block), hi - lo)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _available(self, f: CachedFile, index: int, lo: int, hi: int) -> bool:
        key = self._key(f, index)
        held = self.lru.get(key)
        if held is not None:
            return isinstance(held, bytearray) or held.covered(lo, hi)
        flight = self.flights.get(key)
        # Bytes that landed but are held (the block is checked once whole) are not
        # here yet: a reader would wait for the rest of the block.
        return (
            flight is not None
            and flight.error is None
            and not flight.hold
            and flight.covered(lo, hi)
        )

    def _fail_fast(self, f: CachedFile, spans: list[tuple[int, int, int]]) -> None:
        """Fail at once where a block's fetch failed (or a reader gave up on it) less
        than FAILURE_MEMORY ago, unless the bytes asked for are here after all."""
        now = trio.current_time()
        for index, lo, hi in spans:
            failed = self._recent_failure(self._key(f, index), now)
            if failed is not None and not self._available(f, index, lo, hi):
                self.counts["failed_fast"] += 1
                raise failed[1].with_traceback(None)

    def _recent_failure(
        self, key: tuple[object, ...], now: float
    ) -> tuple[float, BaseException] | None:
        failed = self.failures.get(key)
        if failed is not None and now - failed[0] >= FAILURE_MEMORY:
            del self.failures[key]
            return None
        return failed

    def _timed_out(self, f: CachedFile, spans: list[tuple[int, int, int]]) -> DeadlineError:
        """A reader waited its whole deadline: remember it, so the calls that follow
        (the kernel's page-by-page retry of the same read) fail at once, not after a
        deadline each."""
        self.counts["reader_timeouts"] += 1
        error = DeadlineError(
            f"download {f.ref.uri}: the bytes did not arrive within {self.wait_limit:g}s"
        )
        now = trio.current_time()
        for index, lo, hi in spans:
            if not self._available(f, index, lo, hi):
                self._remember_failure(self._key(f, index), now, error)
        return error

    def _remember_failure(self, key: tuple[object, ...], now: float, error: EnosfsError) -> None:
        if len(self.failures) > 1000:
            self.failures = {k: v for k, v in self.failures.items() if now - v[0] < FAILURE_MEMORY}
        self.failures[key] = (now, error)

    # -- whole-file checks of large files ------------------------------------------------

    def checked_as_read(self, f: CachedFile) -> bool:
        """Files too large to fetch whole before serving are checked as they are read
        from start to end (integrity.py); smaller ones are checked before serving."""
        return f.digest is not None and f.size > self.whole_file_limit

    def known_good(self, f: CachedFile) -> bool:
        """Is every block of f checked before it is served (a whole reading matched)?"""
        return f.key in self.good

    async def matched(self, f: CachedFile, crcs: list[int]) -> None:
        """A whole reading of f matched its digest, so the CRC-32 of each of its blocks,
        taken from the same bytes, is right: from now on every block of f is checked
        against its CRC before it is served, its cached blocks now, and its staged
        blocks on disk may be served."""
        if len(crcs) != (f.size - 1) // self.block_size + 1:
            return
        self.counts["verified_files"] += 1
        if f.key in self.good:
            return  # another reading of it matched first, and did the rest
        self.good[f.key] = crcs
        self.good.move_to_end(f.key)
        while len(self.good) > MAX_GOOD_FILES:
            self.good.popitem(last=False)
        # Blocks on their way: no more of their bytes before they are whole and checked.
        for flight_key, flight in self.flights.items():
            if flight_key[:2] == f.key:
                flight.hold = True
        if self.disk is not None and f.digest is not None:
            keys = {
                key: crcs[i] for i in range(len(crcs)) if (key := self._disk_key(f, i)) is not None
            }
            self.disk.later(self.nursery, self.disk.promote, keys)
        # Blocks cached before now may be other copies than those the reading hashed;
        # readers of the file wait until they are checked.
        scan = self.scanning[f.key] = trio.Event()
        try:
            cached = []
            for i in range(len(crcs)):
                held = self.lru.get(self._key(f, i))
                if isinstance(held, Flight):
                    del self.lru[self._key(f, i)]  # partly filled: no CRC can vouch for it
                elif held:
                    cached.append((i, held))
            found = await trio.to_thread.run_sync(_crcs, [b for _, b in cached])
            for (index, block), crc in zip(cached, found, strict=True):
                if crc != crcs[index] and self.lru.get(self._key(f, index)) is block:
                    del self.lru[self._key(f, index)]
                    self._bad_block(f, index)
        finally:
            if self.scanning.get(f.key) is scan:
                del self.scanning[f.key]
            scan.set()

    def _bad_block(self, f: CachedFile, index: int) -> None:
        self.counts["bad_blocks"] += 1
        _quiet.say(
            logging.WARNING,
            f"{f.ref.uri}: a block did not match the file's checked bytes; fetching it again",
        )

    def corrupt(self, f: CachedFile) -> IntegrityError:
        """A whole reading of f did not match its digest: forget every block of it, in
        memory and on disk, so the next reading fetches them all again."""
        assert f.digest is not None
        self.counts["integrity_failures"] += 1
        log.error(
            "%s: the bytes do not match the %s EnOS gives for the file; its cached blocks "
            "are dropped and the read fails",
            f.ref.uri,
            f.digest[0],
        )
        self.drop(f)
        if self.disk is not None:
            self.disk.later(self.nursery, self.disk.discard, self._disk_keys(f))
        return IntegrityError(f"download {f.ref.uri}: {f.digest[0]} mismatch")

    def _disk_keys(self, f: CachedFile) -> list[str]:
        keys = [self._disk_key(f, i) for i in range((f.size - 1) // self.block_size + 1)]
        return [k for k in keys if k is not None]

    def prefetch(self, f: CachedFile, start: int, stop: int, request: int | None = None) -> int:
        """Start fetching bytes [start, stop) in the background; nobody waits for them.
        Returns where what is under way ends: stop, or less where the budget clipped it
        (the reader's read-ahead asks for the rest again, readahead.py).

        Only as much as the read-ahead share of the memory budget allows: with many
        files open at once, each gets less read-ahead, and memory stays bounded.
        `request` is the bytes one ranged request carries (whole blocks, at most
        max_request): the read-ahead window sizes it so that several are in flight.
        """
        if stop <= start or start >= f.size:
            return stop
        if f.size <= self.whole_file_limit:
            self._ensure_whole(f)  # a small file is only ever fetched, and checked, whole
            return stop
        bs = self.block_size
        first, last = start // bs, (min(stop, f.size) - 1) // bs
        room = self.prefetch_cap - self.inflight
        index = first
        while index <= last:
            if self._missing(f, index):
                room -= self._size_of(f, index)
                if room < 0:
                    break
            index += 1
        if index > first:
            self._ensure(f, first, index - 1, request=request)
        if index <= last:
            self.counts["readahead_clipped"] += 1
            return max(start, index * bs)
        return stop

    def drop(self, f: CachedFile) -> None:
        """Forget every cached block of this version of f."""
        for k in [k for k in self.lru if k[:2] == f.key]:
            del self.lru[k]

    # -- buffers -------------------------------------------------------------------------

    def _consume(self, f: CachedFile, index: int, size: int, n: int) -> None:
        """A sequential reader was served n more bytes of a block of `size`; once it has
        had them all, the block leaves the cache. Counted rather than judged by the read
        that reaches the block's end: the kernel's reads finish in any order (the more
        ranges are on their way, the more so), and a block let go when its end was read
        would be fetched again, a round trip, for a read of its start still waiting."""
        key = self._key(f, index)
        served = self._consumed.pop(key, 0) + n
        if served < size:
            if len(self._consumed) >= MAX_CONSUMED:
                self._consumed.clear()  # readers that stopped halfway through blocks
            self._consumed[key] = served
            return
        self._release(f, index)

    def _release(self, f: CachedFile, index: int) -> None:
        block = self.lru.pop(self._key(f, index), None)
        if isinstance(block, bytearray) and len(block) == self.block_size:
            self._released.append(block)

    def _recycle(self) -> None:
        """Move released buffers that nobody holds any more to the free list.

        Runs at the start of the next read, when pyfuse3 has sent the previous reply and
        let go of its view. Whatever else still holds a buffer (a memoryview on its way
        to the kernel, a reader woken by its flight, a disk write) raises its reference
        count above what a lone buffer has here, and such a buffer is looked at again at
        the next read instead (the latest, as many as the free list has room for):
        reusing it now could change bytes someone is about to send or hash. A whole
        reading being checked holds the views it was served until its worker thread has
        hashed them (integrity.py), a few reads later; a buffer left to the garbage
        collector costs a fresh one, zeroed and faulted in page by page. That lone count
        is measured when the module loads (_FREE_REFS), not assumed, since it differs
        between Python versions.
        """
        if not self._released:
            return
        held: list[bytearray] = []
        for block in self._released:
            if sys.getrefcount(block) > _FREE_REFS:
                held.append(block)
            elif len(self._free) < self.free_cap:
                self._free.append(block)
        # No more than the free list has room for: with it, within its share of the budget.
        room = max(0, self.free_cap - len(self._free))
        self._released = held[max(0, len(held) - room) :]

    def _buffer(self, size: int) -> bytearray:
        if size == self.block_size and self._free:
            self.counts["reused_buffers"] += 1
            return self._free.pop()
        return bytearray(size)

    # -- flights -------------------------------------------------------------------------

    def _key(self, f: CachedFile, index: int) -> tuple[object, ...]:
        return (*f.key, index)

    def _size_of(self, f: CachedFile, index: int) -> int:
        return min(self.block_size, f.size - index * self.block_size)

    async def _block(
        self, f: CachedFile, index: int, lo: int, hi: int, pieces: bool = False
    ) -> bytearray:
        """Block `index` of f with at least its bytes [lo, hi) present (in pieces: a
        random reader's)."""
        key = self._key(f, index)
        held = self.lru.get(key)
        if isinstance(held, bytearray):
            self.counts["hits"] += 1
            return held
        if held is not None and held.buffer is not None and held.covered(lo, hi):
            self.counts["hits"] += 1  # the filled part of a partly filled block
            return held.buffer
        flight = self.flights.get(key)
        if flight is None or flight.gaps(lo, hi):
            # Evicted between _ensure and now (a tiny budget), or its bytes are in no
            # part filled or on its way (a block other readers filled in parts).
            if pieces:
                self._ensure_pieces(f, index, lo, hi)
            else:
                self._ensure(f, index, index)
            flight = self.flights[key]
        self.counts["waits"] += 1
        return await flight.wait_for(lo, hi)

    def has_start(self, f: CachedFile) -> bool:
        """Is f's first block cached, or on its way?"""
        return f.size == 0 or not self._missing(f, 0) or self._on_disk(f, 0)

    def _missing(self, f: CachedFile, index: int) -> bool:
        key = self._key(f, index)
        return key not in self.flights and key not in self.lru

    def _claim(self, f: CachedFile, index: int) -> Flight:
        flight = Flight(self._size_of(f, index), hold=f.key in self.good)
        self.flights[self._key(f, index)] = flight
        self.inflight += flight.size
        return flight

    def _landed_or_lost(self, f: CachedFile, index: int, flight: Flight) -> None:
        if self.flights.get(self._key(f, index)) is flight:
            del self.flights[self._key(f, index)]
        self.inflight -= flight.size

    def _ensure(
        self,
        f: CachedFile,
        first: int,
        last: int,
        hint: int | None = None,
        request: int | None = None,
    ) -> None:
        """Start fetches for the blocks in [first, last] that nobody has or is getting,
        in requests of `request` bytes (default and most: max_request).

        hint is the offset of a read waiting for the first of them: when it lies deep in
        a block, that block is fetched from the hint on first (see the module's doc).
        A block random readers filled in parts gets its missing parts fetched; the last
        of them, when it runs to the block's end, leads the request for the blocks after.
        """
        bs = self.block_size
        per_request = self.max_request if request is None else min(request, self.max_request)
        blocks_per_request = max(1, per_request // bs)
        index = first
        while index <= last:
            owned: dict[int, Flight] = {}
            start = index * bs
            if not self._missing(f, index):
                partial = self._partial(f, index)
                gaps = partial.gaps() if partial is not None else []
                if partial is not None and gaps:
                    tail = gaps.pop() if gaps[-1][1] == partial.size else None
                    for lo, hi in gaps:
                        self._spawn(f, start + lo, start + hi, {index: partial})
                    if tail is not None:
                        owned[index] = partial
                        start += tail[0]
                index += 1
                if not owned:
                    continue
            elif self._on_disk(f, index):
                self._load_soon(f, index)
                index += 1
                continue
            run_start = index
            while (
                index <= last
                and self._missing(f, index)
                and len(owned) < blocks_per_request
                and not self._on_disk(f, index)
            ):
                owned[index] = self._claim(f, index)
                index += 1
            end = min(f.size, index * bs)
            split = None
            if hint is not None and run_start == first and start == run_start * bs:
                split = (hint - start) // SPLIT_ALIGN * SPLIT_ALIGN + start
            if split is not None and split > start:
                self.counts["split_fetches"] += 1
                self._spawn(f, split, end, owned)
                self._spawn(f, start, split, {run_start: owned[run_start]})
            else:
                self._spawn(f, start, end, owned)

    def _ensure_pieces(self, f: CachedFile, index: int, lo: int, hi: int) -> bool:
        """For a random reader: start one fetch of the bytes of block `index` its read
        [lo, hi) needs and nobody has or is getting, grown forward to the link's span
        (linkspeed.py: what the link brings in a small share of a round trip) but never
        onto bytes someone has or is getting, nor past the block's end; True if a fetch
        started. A block on disk is loaded whole (no round trip).

        On a thin link (a span under a piece) the fetch starts at the read's first
        page: bytes before the read would come first and keep the reader waiting. On a
        fast one it starts at the read's piece, since there a piece costs less than the
        span: the bytes before the read add less than the span's own small share of a
        round trip, and readers of one piece share one fetch whatever order they come
        in. Never grown back further: those bytes would come first, or cost a request
        of their own (one more a miss, against a gateway that counts them), for a bet
        on a reader going backwards."""
        key = self._key(f, index)
        held = self.lru.get(key)
        if isinstance(held, bytearray):
            return False
        if held is not None:
            if held.covered(lo, hi):
                return False
            flight = self._revive(f, index, held)
        elif key in self.flights:
            flight = self.flights[key]
        elif self._on_disk(f, index):
            self._load_soon(f, index)
            return False
        else:
            flight = self._claim(f, index)
        if flight.hold:  # checked whole: its fetches bring the whole block
            self._ensure(f, index, index)
            return False
        if not flight.gaps(lo, hi):
            return False  # its bytes landed or are on their way
        span = self.link.span()
        unit = PIECE if span >= PIECE else PAGE
        # The read's missing bytes in whole units (those between two of its gaps come
        # again: one request, not several).
        need = flight.gaps(lo // unit * unit, min(flight.size, -(-hi // unit) * unit))
        a, b = need[0][0], need[-1][1]
        b = max(b, min(a + span, flight.free_after(b)))
        start = index * self.block_size
        self._spawn(f, start + a, start + b, {index: flight}, random_access=True)
        self.counts["random_fetches"] += 1
        return True

    def _partial(self, f: CachedFile, index: int) -> Flight | None:
        """Block `index` of f if it is partly filled (at rest or with fetches under
        way), taken back into the flights if it rested."""
        held = self.lru.get(self._key(f, index))
        if isinstance(held, Flight):
            return self._revive(f, index, held)
        flight = self.flights.get(self._key(f, index))
        return flight if flight is not None and not flight.done.is_set() else None

    def _revive(self, f: CachedFile, index: int, flight: Flight) -> Flight:
        """A partly filled block at rest in the LRU gets fetches again: it is a flight
        once more, and its memory counts as on its way."""
        key = self._key(f, index)
        del self.lru[key]
        self.flights[key] = flight
        self.inflight += flight.size
        return flight

    def _settle(self, f: CachedFile, index: int, flight: Flight) -> None:
        """The last fetch of a block ended with the block still partly filled: it rests
        in the LRU, its filled parts served from there; unless it must be whole first
        (it is checked whole) or a reader waits for bytes no fetch brings, then the rest
        of it is fetched."""
        flight.asked = []
        if flight.hold or flight.waiters or self.known_good(f):
            start = index * self.block_size
            for lo, hi in flight.gaps():
                self._spawn(f, start + lo, start + hi, {index: flight})
            return
        self._landed_or_lost(f, index, flight)
        self.lru[self._key(f, index)] = flight

    def _ensure_whole(self, f: CachedFile) -> None:
        """A small file is only ever fetched whole, so its digest checks every byte a
        reader gets: when some of its blocks were evicted, the whole file is fetched
        again for the missing ones (the cached ones' bytes are hashed, then dropped)."""
        fetch: dict[int, Flight] = {}
        for i in range((f.size - 1) // self.block_size + 1):
            if not self._missing(f, i):
                continue
            if self._on_disk(f, i):  # kept there only once checked
                self._load_soon(f, i)
            else:
                fetch[i] = self._claim(f, i)
        if fetch:
            self._spawn(f, 0, f.size, fetch)

    def _disk_key(self, f: CachedFile, index: int) -> str | None:
        """Only files with a digest go to disk: then a key names one exact content."""
        if self.disk is None or f.digest is None:
            return None
        return block_key(f.ref.uri, f.size, f.digest, self.block_size, index)

    def _on_disk(self, f: CachedFile, index: int) -> bool:
        key = self._disk_key(f, index)
        return key is not None and self.disk is not None and self.disk.has(key)

    def _load_soon(self, f: CachedFile, index: int) -> None:
        flight = self._claim(f, index)
        flight.asked = [(0, flight.size)]  # no reader fetches parts of it meanwhile
        self.nursery.start_soon(self._load, f, index, flight)

    async def _load(self, f: CachedFile, index: int, flight: Flight) -> None:
        """A block from the disk cache; from the network if it is not intact there."""
        key = self._disk_key(f, index)
        assert self.disk is not None and key is not None
        try:
            data = await self.disk.get(key, flight.size)
        except Exception:
            log.exception("disk cache: reading a block failed")
            data = None
        flight.asked = []
        if data is None:
            if f.size <= self.whole_file_limit:
                self._spawn(f, 0, f.size, {index: flight})  # checked whole, as ever
            else:
                start = index * self.block_size
                self._spawn(f, start, start + flight.size, {index: flight})
            return
        flight.buffer = data
        flight.landed(0, flight.size)
        self._deliver(f, index, flight, from_disk=True)

    def _spawn(
        self,
        f: CachedFile,
        start: int,
        end: int,
        owned: dict[int, Flight],
        *,
        random_access: bool = False,
    ) -> None:
        progress = Progress()
        bs = self.block_size
        for index, flight in owned.items():
            flight.fetchers += 1
            flight.feeds.append(progress)
            flight.asked.append((max(start - index * bs, 0), min(end - index * bs, flight.size)))
        self.nursery.start_soon(self._fetch, f, start, end, owned, progress, random_access)

    def _deliver(
        self, f: CachedFile, index: int, flight: Flight, *, from_disk: bool = False
    ) -> None:
        assert flight.buffer is not None
        good = self.good.get(f.key)
        if good is not None and zlib.crc32(flight.buffer) != good[index]:
            self._bad_block(f, index)
            if self.disk is not None and from_disk:
                key = self._disk_key(f, index)
                if key is not None:
                    self.disk.later(self.nursery, self.disk.discard, [key])
            if flight.refetches < MAX_REFETCHES:
                # Again from the network; readers keep waiting (the flight holds), their
                # deadline bounding how long.
                flight.refetches += 1
                flight.spans = []
                flight.asked = []
                start = index * self.block_size
                self._spawn(f, start, start + flight.size, {index: flight})
                return
            self._fail(f, {index: flight}, IntegrityError(f"download {f.ref.uri}: bad block"))
            return
        self.lru[self._key(f, index)] = flight.buffer
        flight.data, flight.buffer = flight.buffer, None
        self._landed_or_lost(f, index, flight)
        self.failures.pop(self._key(f, index), None)
        flight.finish()
        # A block of a large file is kept on disk at once when the file's block CRCs
        # are known (it was just checked); while a whole reading of it may be under
        # way, staged until that reading matches; otherwise not at all, since nothing
        # would ever vouch for it.
        staged = self.checked_as_read(f) and f.key not in self.good
        if staged and not self.readings[f.key]:
            return
        key = None if from_disk else self._disk_key(f, index)
        if key is not None and self.disk is not None:
            # The write task holds the buffer, so it is not reused before it is written.
            self.disk.later(self.nursery, self.disk.put, key, flight.data, staged=staged)

    def _fail(self, f: CachedFile, owned: dict[int, Flight], error: EnosfsError) -> None:
        for index, flight in owned.items():
            if flight.done.is_set():
                continue
            self._landed_or_lost(f, index, flight)
            error = _bare(error)
            self._remember_failure(self._key(f, index), trio.current_time(), error)
            flight.error = error
            flight.buffer = None
            flight.finish()
        owned.clear()

    # -- fetching ------------------------------------------------------------------------

    async def _fetch(
        self,
        f: CachedFile,
        start: int,
        end: int,
        owned: dict[int, Flight],
        progress: Progress | None = None,
        random_access: bool = False,
    ) -> None:
        """Download bytes [start, end) into the blocks they belong to, resuming a cut
        body from the byte it reached. Blocks this task does not own (another fetch
        fills them, or they are cached) are read past. `owned` holds the flights this
        task must still fill; each is let go of as soon as it is delivered, so its
        buffer is not pinned while the rest of the range streams in. Each body's time
        to first byte and speed go to the link's estimate (linkspeed.py)."""
        bs = self.block_size
        pos = start
        block: bytearray | None = None  # buffer of the block holding pos, while in use
        resumes = 0
        slow_bodies = 0  # bodies in a row dropped as too slow
        progress = progress or Progress()
        pace: _Pace | None = None
        reached = pos
        completed = False
        failure: EnosfsError | None = None
        self.counts["fetches"] += 1
        # A whole file fetched at once is checked against its digest before any reader
        # sees a byte of it: its blocks land only after the check.
        verify = f.digest is not None and start == 0 and end == f.size
        # Hashed as the bytes come, blocks this fetch does not own included, so a file
        # part of which is still cached is checked whole all the same.
        hasher = hashlib.new(f.digest[0]) if verify and f.digest is not None else None
        try:
            while pos < end:
                asked_at = trio.current_time()
                held_to: int | None = None  # where a body held since lookup ends by design
                try:
                    async with self.client.open_download(f.ref, pos, end - 1) as body:
                        self._check_version(f, body)
                        held = bool(getattr(body, "held", False))  # fakes have none
                        if held and body.length is not None:
                            held_to = body.start + body.length
                        if not body.ranged:
                            was = pos
                            pos, end = self._adopt_whole_body(
                                f, pos, end, block, owned, progress
                            )
                            if hasher is not None and pos != was:
                                if pos != 0:
                                    raise TransportError(f"download {f.ref.uri}: cannot resume")
                                hasher = hashlib.new(hasher.name)  # hashed again from 0
                        if await _skip(body, pos - body.start):
                            pace = _Pace(self.min_speed, self.speed_time)
                            first_at: float | None = None
                            timed = 0  # bytes after the first read, over the time since
                            while pos < end:
                                index = pos // bs
                                bstart = index * bs
                                flight = owned.get(index)
                                if flight is not None and flight.done.is_set():
                                    flight = None  # the other fetch finished it
                                if block is None:
                                    if flight is None:
                                        block = bytearray(self._size_of(f, index))
                                    else:
                                        if flight.buffer is None:
                                            flight.buffer = self._buffer(flight.size)
                                        block = flight.buffer
                                stop = min(bstart + len(block), end)
                                view = memoryview(block)[pos - bstart : stop - bstart]
                                n = await _read(body, view)
                                if n == 0:
                                    break
                                if pace.too_slow(n):
                                    slow_bodies = (0 if pace.proven else slow_bodies) + 1
                                    self.counts["slow_bodies"] += 1
                                    progress.dropped()
                                    raise _TooSlow
                                progress.got(n, pace.now)
                                self.counts["bytes"] += n
                                if random_access:
                                    self.counts["random_bytes"] += n
                                if first_at is None:
                                    first_at = pace.now
                                    if not held:  # its head came before it was asked
                                        self.link.first_byte(first_at - asked_at)
                                else:
                                    timed += n
                                if hasher is not None:
                                    hasher.update(view[:n])
                                if flight is not None and not verify:
                                    flight.landed(pos - bstart, pos - bstart + n)
                                pos += n
                                if (
                                    flight is not None
                                    and flight.complete
                                    and not flight.done.is_set()  # the other half did
                                ):
                                    self._let_go(owned, index)
                                    self._deliver(f, index, flight)
                                if pos == stop:
                                    block = None
                            if first_at is not None:
                                self.link.body(timed, pace.now - first_at)
                except _Broken as exc:
                    log.debug("download of %s interrupted: %s", f.ref.uri, exc)
                except _TooSlow:
                    # Dropped (its connection with it); the bytes it brought are kept.
                    log.debug("download of %s below the minimum speed", f.ref.uri)
                    if slow_bodies > MAX_RESUMES:
                        raise DeadlineError(
                            f"download {f.ref.uri}: slower than {self.min_speed} bytes/s "
                            f"for {self.speed_time:g}s, {slow_bodies} times"
                        ) from None
                if pace is not None and pace.proven and slow_bodies and not pace.dropped:
                    slow_bodies = 0  # a body that kept its speed for a window
                if pos < end and pos == held_to:
                    continue  # a body held since lookup (firstbytes.py) ends here: the rest
                if pos < end:
                    # Resume as long as each body brings something; give up after
                    # MAX_RESUMES bodies in a row that brought nothing.
                    resumes = 0 if pos > reached else resumes + 1
                    reached = pos
                    self.counts["resumes"] += 1
                    if resumes > MAX_RESUMES:
                        raise TransportError(
                            f"download {f.ref.uri}: body ended early at byte {pos} of {end}, "
                            f"{MAX_RESUMES + 1} times without progress"
                        )
                    log.debug("download of %s cut at byte %d; resuming", f.ref.uri, pos)
            if hasher is not None:
                self._verify_and_deliver(f, owned, hasher.hexdigest())
            completed = True
        except EnosfsError as exc:
            failure = exc
        except Exception as exc:
            # A bug, not a server fault: say so once, and never leave readers hanging.
            log.exception("unexpected error downloading %s", f.ref.uri)
            failure = TransportError(f"download {f.ref.uri}: {type(exc).__name__}")
        finally:
            error = _bare(failure or TransportError(f"download {f.ref.uri}: incomplete"))
            for index in list(owned):
                flight = self._let_go(owned, index)
                if flight.done.is_set():
                    continue
                if not completed:
                    self._fail(f, {index: flight}, error)
                elif flight.fetchers == 0:
                    # Its bytes from this fetch landed, the rest of it nobody fetches
                    # (a random reader's block filled in parts); while other fetches
                    # still fill it, it is left to them.
                    self._settle(f, index, flight)

    def _let_go(self, owned: dict[int, Flight], index: int) -> Flight:
        flight = owned.pop(index)
        flight.fetchers -= 1
        return flight

    def _verify_and_deliver(self, f: CachedFile, owned: dict[int, Flight], got: str) -> None:
        """A whole file's bytes were hashed as they came: check them against its digest,
        then let readers have the blocks this fetch filled."""
        assert f.digest is not None
        algorithm, want = f.digest
        if got != want.lower():
            self.counts["integrity_failures"] += 1
            log.error(
                "%s: the bytes do not match the %s EnOS gives for the file; not served",
                f.ref.uri,
                algorithm,
            )
            raise IntegrityError(f"download {f.ref.uri}: {algorithm} mismatch")
        self.counts["verified_files"] += 1
        for index, flight in list(owned.items()):
            if flight.done.is_set() or flight.buffer is None:
                continue  # filled by another fetch meanwhile
            flight.landed(0, flight.size)
            self._let_go(owned, index)
            self._deliver(f, index, flight)

    def _check_version(self, f: CachedFile, body: Download) -> None:
        """Refuse bytes of another version than f's: a different size, or a different
        ETag from the one this version was first served with."""
        changed = None
        if body.total is not None and body.total != f.size:
            changed = f"the server has {body.total} bytes, this version {f.size}"
        elif body.etag:
            known = self.etags.setdefault(f.key, body.etag)
            if known != body.etag:
                changed = f"its ETag went from {known} to {body.etag}"
            if len(self.etags) > 100_000:
                self.etags.clear()
        if changed is not None:
            self.counts["changed"] += 1
            # The first ETag stays this version's: readers of it keep getting ESTALE
            # rather than new bytes; a new open learns the new version and its own key.
            if self.changes is not None:
                self.changes.content_changed(f.ref.uri)
            raise FileChanged(f"download {f.ref.uri}: the file changed ({changed})")

    def _adopt_whole_body(
        self,
        f: CachedFile,
        pos: int,
        end: int,
        block: bytearray | None,
        owned: dict[int, Flight],
        progress: Progress,
    ) -> tuple[int, int]:
        """The server ignored Range and sends the whole file: take every block it brings.

        Claims the missing blocks nobody else is fetching, so concurrent readers wait on
        this stream instead of starting more whole-file downloads. Returns the new
        (pos, end) to read between.
        """
        bs = self.block_size
        # Partway through a block, that block is kept as it is: its bytes so far may be
        # in a buffer that is not its flight's.
        lowest = pos // bs + 1 if block is not None else 0
        for i in range(lowest, (f.size - 1) // bs + 1):
            if i not in owned and self._missing(f, i):
                owned[i] = self._claim(f, i)
                owned[i].fetchers += 1
                owned[i].feeds.append(progress)
                owned[i].asked.append((0, owned[i].size))
        if block is None:
            pos = min([pos, *(i * bs for i in owned)])
        return pos, max([end, *(min(f.size, (i + 1) * bs) for i in owned)])


class _TooSlow(Exception):
    """A body stayed below the minimum speed for the whole grace period."""


class _Broken(Exception):
    """A body broke off while being read: resumed from the byte it reached.

    Only a failure of the read itself is this. The same TransportError raised while
    opening the download (the source's retries spent) or by the cache's own checks (a
    changed file, a stream that cannot resume) ends the fetch instead.
    """


async def _read(body: Download, view: memoryview) -> int:
    try:
        return await body.readinto(view)
    except TransportError as exc:
        raise _Broken(str(exc)) from None


class _Pace:
    """The speed of one body, measured over windows of `period` seconds."""

    def __init__(self, min_speed: int, period: float) -> None:
        self.floor = min_speed * period
        self.period = period
        self.since = self.now = trio.current_time()
        self.got = 0
        self.proven = False  # a whole window passed above the floor
        self.dropped = False

    def too_slow(self, n: int) -> bool:
        """Count n more bytes; True once a whole window brought fewer than the floor.
        Checked as bytes arrive: a body that brings none at all is caught by the read
        timeout instead."""
        self.now = now = trio.current_time()
        if self.floor <= 0:
            return False
        self.got += n
        if now - self.since < self.period:
            return False
        slow = self.got < self.floor * (now - self.since) / self.period
        self.since, self.got = now, 0
        self.proven = self.proven or not slow
        self.dropped = slow
        return slow


async def _skip(body: Download, count: int) -> bool:
    """Read and drop count bytes (a server that ignored Range); False if the body ended."""
    if count <= 0:
        return True
    scratch = memoryview(bytearray(min(count, 1024 * 1024)))
    while count > 0:
        n = await _read(body, scratch[: min(count, len(scratch))])
        if n == 0:
            return False
        count -= n
    return True


def _crcs(blocks: list[bytearray]) -> list[int]:
    return [zlib.crc32(b) for b in blocks]


def _bare(exc: EnosfsError) -> EnosfsError:
    """The exception without the frames it was raised through: kept in a flight or in
    the failure memory, those frames would pin the buffers of the fetch that failed."""
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


def _held(value: bytearray | Flight) -> int:
    """Memory an LRU entry holds: a partly filled block's whole buffer, allocated whole."""
    return value.size if isinstance(value, Flight) else len(value)
