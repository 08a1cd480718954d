"""Layer 3: the block cache and read-ahead, in process against a fake source whose
requests and bytes are counted and whose faults are scripted (tests/fake_source.py);
one test drives the real client against the emulator, where a body really breaks."""

from __future__ import annotations

import errno
import logging
import random
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from enosfs.api import FileRef
from enosfs.blocks import FAILURE_MEMORY, LIVE, MAX_RESUMES, BlockCache, CachedFile
from enosfs.changes import Changes
from enosfs.errors import (
    DeadlineError,
    FileChanged,
    IntegrityError,
    RateLimited,
    ServerError,
    TransportError,
    errno_of,
)
from enosfs.readahead import MiB, ReadAhead
from enosfs.source import Source
from tests.fake_source import FakeSource, Fault
from tests.support import Emulator, demo_files
from tests.test_client import client_for

BIG = "WTG-001/feature/vibration_raw.bin"
BIG_SIZE = 200 * MiB  # as the demo's: 50 readers 4 MiB apart fit in it


@pytest.fixture(scope="module")
def big_data() -> bytes:
    """Different bytes in every block, made once: a misplaced block shows."""
    return random.Random("vibration").randbytes(BIG_SIZE)


@pytest.fixture
def fake() -> FakeSource:
    return FakeSource()


@asynccontextmanager
async def cache_on(source: Source, **kw: Any) -> AsyncIterator[BlockCache]:
    async with trio.open_nursery() as nursery:
        yield BlockCache(source, nursery, **kw)
        nursery.cancel_scope.cancel()


async def cached(source: Source, ref: FileRef) -> CachedFile:
    return CachedFile.of(ref, await source.file_meta(ref))


async def big_file(fake: FakeSource, data: bytes) -> tuple[CachedFile, bytes]:
    return await cached(fake, fake.add(data)), data


def some_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def downloaded(fake: FakeSource) -> int:
    return fake.stats().get("files.download.bytes", 0)


async def test_reads_are_exact_across_block_boundaries(fake: FakeSource, big_data: bytes) -> None:
    async with cache_on(fake, block_size=64 * 1024, budget=4 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        rnd = random.Random(7)
        cases = [(64 * 1024 - 1, 2), (0, 1), (f.size - 10, 100), (f.size, 10), (f.size - 1, 1)]
        cases += [
            (rnd.randrange(f.size), rnd.choice([1, 100, 4096, 65536, 300_000])) for _ in range(200)
        ]
        for off, n in cases:
            got = await cache.read(f, off, n)
            assert got == want[off : off + n], (off, n)


async def test_single_flight_under_16_concurrent_readers(fake: FakeSource, big_data: bytes) -> None:
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        fake.reset_stats()
        span = 8 * MiB
        results: list[bool] = []

        async def reader(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(40):
                off = rnd.randrange(span - 4096)
                results.append(await cache.read(f, off, 4096) == want[off : off + 4096])

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(reader, i)
        assert len(results) == 640 and all(results)
        # Every byte of the touched blocks came over the wire exactly once.
        assert downloaded(fake) <= span
        # At most two requests a block (a read deep in a block fetches its tail first).
        assert cache.counts["fetches"] <= 2 * 8


async def test_sequential_reader_gets_growing_readahead(fake: FakeSource, big_data: bytes) -> None:
    async with cache_on(fake, block_size=1 * MiB, budget=128 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        fake.reset_stats()
        ra = ReadAhead(initial=1 * MiB, maximum=16 * MiB)
        off, step, total = 0, 128 * 1024, 48 * MiB
        while off < total:
            assert await cache.read(f, off, step) == want[off : off + step]
            ahead = ra.on_read(off, step, f.size)
            if ahead:
                cache.prefetch(f, *ahead)
            off += step
        assert ra.window == 16 * MiB
        stats = fake.stats()
        # Ranged requests of an eighth of the window once it is open (2 MiB here), of a
        # block or so while it opens: fewer than one per block, and little fetched
        # beyond the reader.
        assert stats["files.download"] <= 40
        assert total <= stats["files.download.bytes"] <= total + 17 * MiB
        assert cache.counts["hits"] > 0


async def sequential_reader(
    cache: BlockCache, f: CachedFile, want: bytes, ra: ReadAhead, total: int, sample: Any
) -> None:
    """Read f from its start as fs.py serves a cold sequential reader (the kernel's
    128 KiB reads, read-ahead in requests the window sizes), calling sample(offset)
    after each read with the offset the reader reached."""
    off, step = 0, 128 * 1024
    while off < total:
        data = await cache.read(f, off, step, consume=ra.sequential)
        assert data == want[off : off + step], off
        ahead = ra.on_read(off, step, f.size)
        if ahead:
            reached = cache.prefetch(f, *ahead, request=ra.request)
            if reached < ahead[1]:
                ra.clipped(reached)
        off += step
        await trio.lowlevel.checkpoint()  # as pyfuse3 does between reads
        sample(off)


async def test_a_far_sequential_reader_keeps_several_ranges_in_flight(
    autojump_clock: MockClock, big_data: bytes
) -> None:
    """40 ms away, each body paced at 25 MB/s (one TCP stream's share of a faster
    link): a cold sequential reader fills the link only with several ranges on their
    way at every moment. Once its window is open, about eight are (six at least on
    average, sampled every 10 ms), each of whole blocks and at most max_request."""
    fake = FakeSource()
    fake.faults += [Fault("latency", seconds=0.04), Fault("trickle", rate=25_000_000)]
    async with cache_on(fake, block_size=1 * MiB, budget=512 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        fake.reset_stats()
        ra = ReadAhead(initial=1 * MiB, maximum=64 * MiB)
        reached = 0
        under_way: list[int] = []  # ranges on their way, every 10 ms

        def sample(off: int) -> None:
            nonlocal reached
            reached = off

        async def sampler() -> None:
            while reached < 128 * MiB:  # before the window meets the end of the file
                if reached >= 32 * MiB:  # the window is whole
                    under_way.append(fake.requests_under_way)
                await trio.sleep(0.01)

        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler)
            await sequential_reader(cache, f, want, ra, 160 * MiB, sample)
        took = trio.current_time() - started
        assert ra.window == 64 * MiB
        assert len(under_way) > 20
        assert sum(under_way) / len(under_way) >= 6, under_way
        assert min(under_way) >= 4, under_way
        requests = fake.stats()["files.download"]
        assert 160 // 8 <= requests <= 160 // 2
        assert cache.counts["readahead_clipped"] == 0
        # Not a speed test: a reader on one body at a time could not pass 25 MB/s.
        assert 160 * MiB / took > 2 * 25_000_000


async def test_a_sequential_readers_reads_finishing_out_of_order_fetch_blocks_once(
    fake: FakeSource, big_data: bytes
) -> None:
    """The kernel's reads of a sequential reader finish in any order: a block whose end
    was read first stays cached until its start is read too, rather than leave at once
    and be fetched again for the read of its start; read whole, it leaves."""
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        fake.reset_stats()
        half = 512 * 1024
        for off in (half, 0, MiB + half, MiB):  # each block's end first, then its start
            assert await cache.read(f, off, half, consume=True) == want[off : off + half]
        assert downloaded(fake) == 2 * MiB
        assert len(cache.lru) == 0


async def test_buffers_a_reader_still_holds_are_reused_once_let_go_never_before(
    fake: FakeSource, big_data: bytes
) -> None:
    """A whole reading being checked holds the views it was served until its thread
    has hashed them, a few reads later (integrity.py). The buffers of the blocks it read
    through are reused once those views are let go, rather than left for fresh ones;
    while a view is held, its bytes never change."""
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        held: list[tuple[int, bytes | memoryview]] = []
        for off in range(0, 24 * MiB, MiB):
            held.append((off, await cache.read(f, off, MiB, consume=True)))
            for at, view in held:
                assert view == want[at : at + MiB]
            if len(held) > 4:
                del held[0]  # hashed: let go
        assert isinstance(held[0][1], memoryview)  # a view of the block, not a copy
        # Blocks 0..18 were let go, each before the read of a block 5 further on.
        assert cache.counts["reused_buffers"] >= 24 - 6


async def test_read_ahead_ranges_stay_within_the_read_ahead_budget(
    autojump_clock: MockClock, big_data: bytes
) -> None:
    """A window larger than the read-ahead share of a small budget: the blocks on their
    way never exceed that share (plus the block the reader waits for), however many
    ranges the window asks for."""
    fake = FakeSource()
    fake.faults += [Fault("latency", seconds=0.04), Fault("trickle", rate=25_000_000)]
    async with cache_on(fake, block_size=1 * MiB, budget=32 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        ra = ReadAhead(initial=1 * MiB, maximum=64 * MiB)
        peak = 0

        def sample(off: int) -> None:
            nonlocal peak
            peak = max(peak, cache.inflight)

        await sequential_reader(cache, f, want, ra, 48 * MiB, sample)
        assert cache.prefetch_cap == 8 * MiB
        assert peak <= cache.prefetch_cap + cache.block_size
        assert cache.counts["readahead_clipped"] > 0
        assert cache.lru.currsize <= cache.lru.maxsize


async def test_random_reader_fetches_only_what_it_reads(fake: FakeSource, big_data: bytes) -> None:
    async with cache_on(fake, block_size=256 * 1024, budget=64 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        fake.reset_stats()
        ra = ReadAhead()
        rnd = random.Random(3)
        blocks = set()
        for _ in range(100):
            off = rnd.randrange(f.size - 4096)
            assert await cache.read(f, off, 4096) == want[off : off + 4096]
            blocks.update({off // cache.block_size, (off + 4095) // cache.block_size})
            ahead = ra.on_read(off, 4096, f.size)
            assert ahead is None
        assert downloaded(fake) <= len(blocks) * cache.block_size
        # A read deep in a block fetches the block's tail first, then its head.
        assert fake.stats()["files.download"] <= 2 * len(blocks)
        assert cache.counts["split_fetches"] > 0


# -- random readers: pieces, not blocks --------------------------------------------------

PIECE_SIZE = 64 * 1024


async def random_read(cache: BlockCache, f: CachedFile, off: int, n: int) -> bytes:
    return bytes(await cache.read(f, off, n, random_access=True))


async def fetched(cache: BlockCache) -> None:
    """Until no fetch is under way: a reader is served before its fetch has ended."""
    while cache.flights:
        await trio.sleep(0.001)


async def test_a_random_4k_read_fetches_a_few_pieces_not_its_block(
    fake: FakeSource, big_data: bytes
) -> None:
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        fake.reset_stats()
        rnd = random.Random(21)
        for _ in range(50):
            off = rnd.randrange(f.size - 4096)
            before, requests = downloaded(fake), fake.stats().get("files.download", 0)
            assert await random_read(cache, f, off, 4096) == want[off : off + 4096]
            await fetched(cache)  # the rest of its fetch, after the bytes it waited for
            # One request a block it touches, for 128 KiB at most each (nothing measured
            # a faster link).
            touched = len({off // MiB, (off + 4095) // MiB})
            assert fake.stats().get("files.download", 0) - requests <= touched
            assert downloaded(fake) - before <= touched * 128 * 1024
        random_reads = cache.stats()["cache"]["random_reads"]
        assert 40 <= random_reads["misses"] <= 50
        assert random_reads["bytes_fetched"] == downloaded(fake)
        assert random_reads["misses"] <= random_reads["fetches"] == fake.stats()["files.download"]
        assert random_reads["bytes_fetched"] <= random_reads["fetches"] * 128 * 1024
        assert random_reads["partial_blocks"] > 0


async def test_two_random_reads_in_one_piece_cost_one_fetch(fake: FakeSource) -> None:
    want = some_bytes(8 * MiB)
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f = await cached(fake, fake.add(want, md5=False))
        fake.reset_stats()
        piece = 3 * MiB + 5 * PIECE_SIZE
        assert await random_read(cache, f, piece + 100, 4096) == want[piece + 100 : piece + 4196]
        await fetched(cache)  # the rest of its fetch, after the bytes it waited for
        # After the first read's fetch ended: its block rests, partly filled.
        off = piece + 40_000
        assert await random_read(cache, f, off, 4096) == want[off : off + 4096]
        assert fake.stats()["files.download"] == 1
        assert cache.counts["random_misses"] == 1 and cache.counts["hits"] == 1
        assert not cache.flights
        # The partly filled block counts in memory as its whole buffer.
        assert len(cache.lru) == 1 and cache.lru.currsize == MiB


async def test_concurrent_random_readers_of_one_piece_share_its_fetch(fake: FakeSource) -> None:
    want = some_bytes(8 * MiB)
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f = await cached(fake, fake.add(want, md5=False))
        fake.reset_stats()
        fake.faults.append(Fault("latency", seconds=0.05))
        piece = 5 * MiB + 2 * PIECE_SIZE
        results: list[bool] = []

        async def reader(i: int) -> None:
            off = piece + i * 7000
            results.append(await random_read(cache, f, off, 1000) == want[off : off + 1000])

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(reader, i)
        assert results == [True] * 8
        assert fake.stats()["files.download"] == 1
        assert downloaded(fake) <= 128 * 1024


async def test_a_block_filled_in_parts_serves_every_byte_right(
    fake: FakeSource, big_data: bytes
) -> None:
    """Pieces of one block fetched by random reads in any order, some of them straddling
    two pieces or two blocks, then the whole block read: every byte is the file's."""
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        base = 7 * MiB
        for off, n in ((600_000, 1), (10, 4096), (300_000, 70_000), (40_000, 100_000)):
            off += base
            assert await random_read(cache, f, off, n) == want[off : off + n], (off, n)
        # Across the block's end into the next block, also in parts.
        off = base + MiB - 3000
        assert await random_read(cache, f, off, 6000) == want[off : off + 6000]
        held = cache.lru.get((*f.key, 7))
        assert held is not None and not isinstance(held, bytearray)  # still in parts
        # Every 4 KiB of the block, in random order, as a random reader.
        offsets = list(range(base, base + MiB, 4096))
        random.Random(4).shuffle(offsets)
        for off in offsets:
            assert await random_read(cache, f, off, 4096) == want[off : off + 4096], off
        # And the block whole, as a sequential reader.
        assert bytes(await cache.read(f, base, MiB)) == want[base : base + MiB]
        assert isinstance(cache.lru.get((*f.key, 7)), bytearray)
        # Each byte of the block came over the wire once.
        assert cache.counts["random_bytes"] <= MiB + 128 * 1024


async def test_random_and_sequential_readers_mixed_under_a_small_budget(
    fake: FakeSource, big_data: bytes
) -> None:
    """Blocks filled in parts, evicted, taken up again, completed by a sequential
    reader, all at once: every byte right, memory bounded, nothing left in flight."""
    budget = 8 * MiB
    async with cache_on(fake, block_size=1 * MiB, budget=budget) as cache:
        f, want = await big_file(fake, big_data)
        span = 24 * MiB
        results: list[bool] = []

        async def random_reader(seed: int) -> None:
            rnd = random.Random(seed)
            for _ in range(60):
                off = rnd.randrange(span - 70_000)
                n = rnd.choice([1, 4096, 70_000])
                results.append(await random_read(cache, f, off, n) == want[off : off + n])
                assert cache.lru.currsize <= cache.lru.maxsize

        async def sequential_reader(start: int) -> None:
            for off in range(start, start + 6 * MiB, 256 * 1024):
                data = await cache.read(f, off, 256 * 1024)
                results.append(bytes(data) == want[off : off + 256 * 1024])

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(random_reader, i)
            for start in (0, 9 * MiB, 17 * MiB):
                nursery.start_soon(sequential_reader, start)
        assert len(results) == 8 * 60 + 3 * 24 and all(results)
        await fetched(cache)
        assert cache.inflight == 0 and fake.open_bodies == 0


async def test_a_random_reader_turned_sequential_gets_whole_blocks_and_read_ahead(
    fake: FakeSource, big_data: bytes
) -> None:
    async with cache_on(fake, block_size=1 * MiB, budget=128 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        fake.reset_stats()
        ra = ReadAhead(initial=1 * MiB, maximum=8 * MiB)
        # Random 4 KiB reads, two of them in block 10 where the reader then stays.
        for off in (40 * MiB + 5, 3 * MiB + 77, 10 * MiB + 300_000, 90 * MiB, 10 * MiB + 9):
            assert ra.random(off, 4096)
            assert await random_read(cache, f, off, 4096) == want[off : off + 4096]
            assert ra.on_read(off, 4096, f.size) is None
        assert fake.stats()["files.download"] == 5
        # Now straight on from block 10's start, 4 KiB at a time, as the kernel
        # without read-ahead would: random for its first read, then sequential.
        fake.reset_stats()
        off, step = 10 * MiB, 4096
        patterns = []
        while off < 20 * MiB:
            patterns.append(ra.random(off, step))
            data = await cache.read(f, off, step, random_access=patterns[-1])
            assert bytes(data) == want[off : off + step], off
            ahead = ra.on_read(off, step, f.size)
            if ahead:
                cache.prefetch(f, *ahead)
            off += step
        assert not any(patterns[2:]) and ra.sequential
        stats = fake.stats()
        # Block 10's missing parts, then whole blocks ahead, in requests of an eighth of
        # the window (a block at least: here the window is 8 MiB at most).
        assert stats["files.download"] <= 20
        assert downloaded(fake) <= 10 * MiB + 8 * MiB
        assert all(isinstance(cache.lru.get((*f.key, i)), bytearray) for i in range(11, 20))
        assert isinstance(cache.lru.get((*f.key, 10)), bytearray)


PAGE_SIZE = 4096


def record_ranges(fake: FakeSource) -> list[tuple[int, int]]:
    """The byte ranges [start, end) the cache asks the fake for, as they are opened
    (end -1: to the file's end)."""
    asked: list[tuple[int, int]] = []
    opened = fake.open_download

    def open_download(ref: FileRef, start: int = 0, end: int | None = None) -> Any:
        asked.append((start, -1 if end is None else end + 1))
        return opened(ref, start, end)

    fake.open_download = open_download  # type: ignore[method-assign]
    return asked


def landed_right(cache: BlockCache, f: CachedFile, index: int, want: bytes) -> int:
    """Every byte of a partly filled block that landed is the file's; how many landed."""
    held = cache.lru.get((*f.key, index))
    assert held is not None and not isinstance(held, bytearray) and held.buffer is not None
    base = index * cache.block_size
    for lo, hi in held.spans:
        assert held.buffer[lo:hi] == want[base + lo : base + hi], (lo, hi)
    return sum(hi - lo for lo, hi in held.spans)


def on_a_link(rate: float) -> FakeSource:
    """A fake 40 ms away whose bodies come at rate bytes a second."""
    fake = FakeSource()
    fake.faults += [Fault("latency", seconds=0.04), Fault("trickle", rate=rate)]
    return fake


@pytest.mark.parametrize(
    ("rate", "span", "at", "ranges"),
    [
        # 2 MB/s: a sixteenth of the ~73 ms first byte brings 9100 bytes, two pages. A
        # read across two pages is its span; one on a page boundary grows a page on.
        (2_000_000, 2 * PAGE_SIZE, 300_000, [(73 * PAGE_SIZE, 75 * PAGE_SIZE)]),
        (2_000_000, 2 * PAGE_SIZE, 200 * PAGE_SIZE, [(200 * PAGE_SIZE, 202 * PAGE_SIZE)]),
        # The block's last page: a thin link's span never grows back.
        (2_000_000, 2 * PAGE_SIZE, MiB - PAGE_SIZE, [(MiB - PAGE_SIZE, MiB)]),
        # 25 MB/s: 66 kB, one whole piece (it costs less than the span: from the
        # read's piece on).
        (25_000_000, PIECE_SIZE, 10_000, [(0, PIECE_SIZE)]),
        # 125 MB/s: 316 kB, four pieces; near the block's end only up to it (never
        # back: in one request).
        (125_000_000, 4 * PIECE_SIZE, 200_000, [(3 * PIECE_SIZE, 7 * PIECE_SIZE)]),
        (125_000_000, 4 * PIECE_SIZE, MiB - 100_000, [(14 * PIECE_SIZE, MiB)]),
    ],
)
async def test_a_random_miss_fetches_what_the_link_gives_in_a_small_share_of_a_round_trip(
    autojump_clock: MockClock,
    big_data: bytes,
    rate: float,
    span: int,
    at: int,
    ranges: list[tuple[int, int]],
) -> None:
    """40 ms away, a miss fetches what the link brings in a sixteenth of a round trip:
    a page or two at 2 MB/s, whole pieces on faster links; never over the block, in one
    request that starts at the read's first page on a thin link, its piece on a fast
    one. The fake's first 64 KiB of a body come as
    one chunk, at the body's speed, so its time to first byte is longer than the 40 ms
    (73 ms at 2 MB/s)."""
    fake = on_a_link(rate)
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        # A sequential reader's whole blocks show the link's speed.
        assert bytes(await cache.read(f, 0, 2 * MiB)) == want[: 2 * MiB]
        await fetched(cache)
        assert cache.link.span() == span
        assert cache.stats()["cache"]["random_reads"]["random_fetch_bytes"] == span
        before = downloaded(fake)
        asked = record_ranges(fake)
        base = 50 * MiB
        off = base + at
        assert await random_read(cache, f, off, 4096) == want[off : off + 4096]
        await fetched(cache)
        assert asked == [(base + a, base + b) for a, b in ranges]
        if span < PIECE_SIZE:
            assert asked[0][0] == off // PAGE_SIZE * PAGE_SIZE  # the read's bytes first
        fetched_bytes = sum(b - a for a, b in ranges)
        assert downloaded(fake) - before == fetched_bytes
        assert landed_right(cache, f, 50, want) == fetched_bytes


async def test_on_a_thin_link_pages_are_fetched_once_however_random_reads_overlap(
    autojump_clock: MockClock, big_data: bytes
) -> None:
    """Page-sized spans keep single flight per byte: readers of pages on their way wait
    for them, readers of pages beside them fetch only the pages nobody fetches, and the
    pages merge into one filled part."""
    fake = on_a_link(2_000_000)
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        assert bytes(await cache.read(f, 0, 2 * MiB)) == want[: 2 * MiB]
        await fetched(cache)
        assert cache.link.span() == 2 * PAGE_SIZE
        before = downloaded(fake)
        base = 9 * MiB + 40 * PAGE_SIZE
        # Reads of every one of ten pages, some across two pages, all at once.
        reads = [(0, 4096), (100, 4096), (PAGE_SIZE + 1, 1), (3 * PAGE_SIZE - 10, 20)]
        reads += [(5 * PAGE_SIZE, 3 * PAGE_SIZE), (2 * PAGE_SIZE, 4096), (4 * PAGE_SIZE + 7, 10)]
        reads += [(8 * PAGE_SIZE, 4096), (9 * PAGE_SIZE, 300)]
        results: list[bool] = []

        async def reader(at: int, n: int) -> None:
            off = base + at
            results.append(await random_read(cache, f, off, n) == want[off : off + n])

        async with trio.open_nursery() as nursery:
            for at, n in reads:
                nursery.start_soon(reader, at, n)
        await fetched(cache)
        assert results == [True] * len(reads)
        # No byte twice, and at most the page after the last one read besides.
        got = downloaded(fake) - before
        assert got == landed_right(cache, f, 9, want)
        assert 10 * PAGE_SIZE <= got <= 11 * PAGE_SIZE
        held = cache.lru.get((*f.key, 9))
        assert held is not None and not isinstance(held, bytearray)
        assert len(held.spans) == 1  # the pages merged
        assert cache.counts["random_bytes"] == got


@pytest.mark.allow_warnings(r"did not match the file's checked bytes")
async def test_a_checked_file_is_read_in_whole_checked_blocks_by_random_readers(
    fake: FakeSource,
) -> None:
    """Once a whole reading matched, every block is checked against its CRC: a random
    reader gets whole blocks (a part cannot be checked), and a block filled in parts
    before is dropped, not served."""
    want = some_bytes(6 * MiB)
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB, whole_file_limit=0) as cache:
        f = await cached(fake, fake.add(want))
        off = 2 * MiB + 10
        assert await random_read(cache, f, off, 4096) == want[off : off + 4096]
        await fetched(cache)
        assert cache.stats()["cache"]["random_reads"]["partial_blocks"] == 1
        crcs = [zlib.crc32(want[i : i + MiB]) for i in range(0, len(want), MiB)]
        await cache.matched(f, crcs)
        assert cache.stats()["cache"]["random_reads"]["partial_blocks"] == 0
        fake.reset_stats()
        fake.faults.append(Fault("corrupt", after=1000, times=1))
        # The same bytes again: a whole block, checked, the corrupt copy refused.
        assert await random_read(cache, f, off, 4096) == want[off : off + 4096]
        assert cache.counts["bad_blocks"] == 1
        assert downloaded(fake) == 2 * MiB
        assert isinstance(cache.lru.get((*f.key, 2)), bytearray)


async def test_memory_budget_holds(fake: FakeSource, big_data: bytes) -> None:
    budget = 8 * MiB
    async with cache_on(fake, block_size=1 * MiB, budget=budget) as cache:
        f, want = await big_file(fake, big_data)
        for off in range(0, 64 * MiB, 1 * MiB):
            assert await cache.read(f, off, 4096) == want[off : off + 4096]
            assert cache.lru.currsize <= budget
        assert len(cache.lru) <= 8


async def test_server_ignoring_range_still_serves_correct_bytes(
    fake: FakeSource, big_data: bytes
) -> None:
    fake.honour_range = False
    async with cache_on(fake, block_size=1 * MiB, budget=256 * MiB) as cache:
        f, want = await big_file(fake, big_data)
        fake.reset_stats()
        # The first read learns that Range is ignored and keeps the stream going; the
        # readers that come after it wait on that stream instead of starting their own.
        assert await cache.read(f, 5 * MiB, 10) == want[5 * MiB : 5 * MiB + 10]
        rnd = random.Random(11)
        offsets = [rnd.randrange(f.size - 70_000) for _ in range(24)] + [f.size - 5]
        results: list[bool] = []

        async def reader(off: int) -> None:
            results.append(await cache.read(f, off, 70_000) == want[off : off + 70_000])

        async with trio.open_nursery() as nursery:
            for off in offsets:
                nursery.start_soon(reader, off)
        assert all(results) and len(results) == len(offsets)
        # One whole-file stream served every reader.
        assert fake.stats()["files.download.full"] == 1
        assert fake.stats()["files.download"] == 1
        assert len(cache.flights) == 0


async def test_small_file_in_one_request(fake: FakeSource) -> None:
    async with cache_on(fake, block_size=64 * 1024, budget=16 * MiB) as cache:
        want = b"".join(b"%d,%d,%.3f\n" % (i, i * 7 % 1000, i / 3) for i in range(20_000))
        f = await cached(fake, fake.add(want, ext=".csv"))
        assert 64 * 1024 < f.size <= cache.whole_file_limit
        fake.reset_stats()
        out = b"".join([await cache.read(f, off, 4096) for off in range(0, f.size, 4096)])
        assert out == want
        assert fake.stats()["files.download"] == 1


async def test_memory_budget_holds_with_50_sequential_readers(
    fake: FakeSource, big_data: bytes
) -> None:
    """50 files read at once, each wanting up to 16 MiB of read-ahead: the read-ahead
    share of the budget clips them, and block memory stays within the budget."""
    budget = 32 * MiB
    async with cache_on(fake, block_size=1 * MiB, budget=budget) as cache:
        f, want = await big_file(fake, big_data)
        peak = 0.0  # cachetools sizes are floats
        results: list[bool] = []

        async def reader(i: int) -> None:
            nonlocal peak
            ra = ReadAhead(initial=1 * MiB, maximum=16 * MiB)
            start = i * 4 * MiB
            for off in range(start, start + 3 * MiB, 256 * 1024):
                ahead = ra.on_read(off, 256 * 1024, f.size)
                if ahead:
                    cache.prefetch(f, *ahead)
                data = await cache.read(f, off, 256 * 1024, consume=ra.sequential)
                results.append(data == want[off : off + 256 * 1024])
                held = cache.lru.currsize + cache.inflight + len(cache._free) * cache.block_size
                peak = max(peak, held)

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(reader, i)
        assert len(results) == 50 * 12 and all(results)
        assert cache.counts["readahead_clipped"] > 0
        # Demand reads are never held back: 50 readers may each wait on one block.
        assert peak <= budget + 50 * cache.block_size
        assert cache.lru.currsize <= budget
        await fetched(cache)  # read-ahead the last reads asked for
        assert cache.inflight == 0 and not cache.flights
        assert fake.open_bodies == 0


@pytest.mark.allow_warnings(r"do not match the md5")
async def test_a_small_file_partly_evicted_is_checked_whole_again(fake: FakeSource) -> None:
    want = some_bytes(3 * MiB + 17)
    ref = fake.add(want)
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f = await cached(fake, ref)
        assert 2 * MiB < f.size <= cache.whole_file_limit
        assert await cache.read(f, 0, f.size) == want
        del cache.lru[(*f.key, 1)]  # evicted, as a busy cache does
        fake.faults.append(Fault("corrupt", after=1234))
        # Block 1 comes again with a bad byte: the file is checked whole, not served.
        with pytest.raises(IntegrityError):
            await cache.read(f, MiB, 4096)
        fake.faults.clear()
        cache.failures.clear()
        assert await cache.read(f, MiB, 4096) == want[MiB : MiB + 4096]


# -- faults, in process ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cut", "reset"])
async def test_a_body_cut_short_resumes_from_the_byte_it_reached(
    fake: FakeSource, kind: str
) -> None:
    """A body that ends early (cut) or breaks off (reset) is resumed, not restarted."""
    want = some_bytes(5 * MiB + 123)
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f = await cached(fake, fake.add(want, md5=False))
        fake.faults.append(Fault(kind, after=300_000, times=1))
        assert await cache.read(f, 0, 4 * MiB) == want[: 4 * MiB]
        assert cache.counts["resumes"] == 1
        assert fake.stats()["files.download"] == 2
        assert downloaded(fake) == 4 * MiB
        assert fake.open_bodies == 0


async def test_a_body_cut_every_time_fails_never_short_data(fake: FakeSource) -> None:
    want = some_bytes(5 * MiB)
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB) as cache:
        f = await cached(fake, fake.add(want, md5=False))
        fake.faults.append(Fault("reset", after=0))
        with pytest.raises(TransportError) as err:
            await cache.read(f, 0, 4096)
        assert not isinstance(err.value, DeadlineError)
        assert errno_of(err.value) == errno.EIO
        assert "without progress" in str(err.value) and "\n" not in str(err.value)
        # Bodies that bring nothing are retried a few times, then the read fails.
        assert fake.stats()["files.download"] == MAX_RESUMES + 1


async def test_a_stalled_body_is_dropped_at_the_read_timeout_and_resumed(
    autojump_clock: MockClock,
) -> None:
    fake = FakeSource(timeout=5)
    want = some_bytes(3 * MiB)
    async with cache_on(fake, block_size=1 * MiB, budget=64 * MiB, whole_file_limit=0) as cache:
        f = await cached(fake, fake.add(want))
        fake.faults.append(Fault("stall", after=300_000, seconds=600, times=1))
        assert await cache.read(f, 0, 1 * MiB) == want[: 1 * MiB]
        assert cache.counts["resumes"] == 1
        # Within the reader's own deadline: the read timeout ends the stall first.
        assert cache.counts["reader_timeouts"] == 0


async def test_a_body_below_the_minimum_speed_is_resumed(autojump_clock: MockClock) -> None:
    fake = FakeSource(timeout=10)
    want = some_bytes(3 * MiB)
    async with cache_on(
        fake, block_size=1 * MiB, whole_file_limit=0, min_speed=100_000, speed_time=1.0
    ) as cache:
        f = await cached(fake, fake.add(want))
        fake.faults.append(Fault("trickle", rate=1000, times=1))
        assert await cache.read(f, 0, 1 * MiB) == want[: 1 * MiB]
        assert cache.counts["slow_bodies"] == 1 and cache.counts["resumes"] == 1


async def test_a_trickle_that_starts_late_does_not_extend_the_readers_wait(
    autojump_clock: MockClock,
) -> None:
    """Bytes that come, but too slowly, count as not coming from their first second:
    the reader fails at its own deadline, not a second after it."""
    fake = FakeSource(timeout=5)
    want = some_bytes(3 * MiB)
    async with cache_on(fake, block_size=1 * MiB, whole_file_limit=0, min_speed=8192) as cache:
        f = await cached(fake, fake.add(want))
        fake.faults += [Fault("latency", seconds=4.9, times=1), Fault("trickle", rate=1000)]
        started = trio.current_time()
        with pytest.raises(DeadlineError):
            await cache.read(f, 0, 4096)
        assert trio.current_time() - started < cache.wait_limit + LIVE / 2


async def test_the_retry_of_a_timed_out_read_of_a_checked_file_fails_at_once(
    autojump_clock: MockClock,
) -> None:
    """Once a file's whole reading matched, a block's bytes are held until the block is
    whole and checked: bytes that landed but are held are not "here" for the kernel's
    retry of a read that ran out of time, which must fail at once, not wait again."""
    fake = FakeSource(timeout=3)
    want = some_bytes(3 * MiB)
    async with cache_on(fake, block_size=1 * MiB, whole_file_limit=0, min_speed=8192) as cache:
        f = await cached(fake, fake.add(want))
        await cache.matched(f, [zlib.crc32(want[i : i + MiB]) for i in range(0, len(want), MiB)])
        fake.faults.append(Fault("trickle", rate=1000))
        with pytest.raises(DeadlineError):
            await cache.read(f, 1 * MiB, 100)
        retried = trio.current_time()
        with pytest.raises(DeadlineError):  # its first 100 bytes landed, held
            await cache.read(f, 1 * MiB, 100, no_wait=True)
        assert trio.current_time() == retried


async def test_a_slow_answer_within_the_deadline_is_waited_for(autojump_clock: MockClock) -> None:
    fake = FakeSource(timeout=5)
    want = some_bytes(100_000)
    async with cache_on(fake) as cache:
        f = await cached(fake, fake.add(want))
        fake.faults.append(Fault("latency", seconds=4, times=1))
        assert await cache.read(f, 0, 4096) == want[:4096]


async def test_an_answer_past_the_deadline_fails_the_read_then_recovers(
    autojump_clock: MockClock,
) -> None:
    fake = FakeSource(timeout=5)
    want = some_bytes(100_000)
    async with cache_on(fake) as cache:
        f = await cached(fake, fake.add(want))
        fake.faults.append(Fault("latency", seconds=60, times=1))
        with pytest.raises(DeadlineError) as err:
            await cache.read(f, 0, 4096)
        assert errno_of(err.value) == errno.ETIMEDOUT
        # The kernel's retry of the same read fails at once, not after a deadline more.
        with pytest.raises(DeadlineError):
            await cache.read(f, 0, 4096)
        assert cache.counts["failed_fast"] == 1
        await trio.sleep(FAILURE_MEMORY)
        assert await cache.read(f, 0, 4096) == want[:4096]


@pytest.mark.parametrize("status", [429, 503])
async def test_rate_limits_and_server_errors_fail_the_read_then_recover(
    autojump_clock: MockClock, status: int
) -> None:
    """The source has spent its retries: the cache adds none of its own (no storm)."""
    fake = FakeSource()
    want = some_bytes(100_000)
    async with cache_on(fake) as cache:
        f = await cached(fake, fake.add(want))
        fake.reset_stats()
        fake.faults.append(Fault("error", status=status, times=1))
        with pytest.raises(RateLimited if status == 429 else ServerError) as err:
            await cache.read(f, 0, 4096)
        assert errno_of(err.value) == errno.EIO
        assert fake.stats()["files.download"] == 1
        await trio.sleep(FAILURE_MEMORY)
        assert await cache.read(f, 0, 4096) == want[:4096]


async def test_a_file_changed_between_two_requests_is_estale_never_mixed(
    fake: FakeSource,
) -> None:
    old, new = some_bytes(3 * MiB, seed=1), some_bytes(3 * MiB, seed=2)
    ref = fake.add(old)
    async with cache_on(fake, block_size=1 * MiB, whole_file_limit=0) as cache:
        changed: list[str] = []

        class Told(Changes):
            def content_changed(self, uri: str) -> None:
                changed.append(uri)

        cache.changes = Told(cache.nursery)
        f = await cached(fake, ref)
        assert await cache.read(f, 0, 4096) == old[:4096]
        fake.replace(ref, new)  # same size, new ETag
        with pytest.raises(FileChanged) as err:
            await cache.read(f, 2 * MiB, 4096)
        assert errno_of(err.value) == errno.ESTALE
        assert changed == [ref.uri] and cache.counts["changed"] == 1
        # What this version's readers had stays theirs; a new open reads the new bytes.
        assert await cache.read(f, 0, 4096) == old[:4096]
        g = await cached(fake, ref)
        assert g.key != f.key
        assert await cache.read(g, 2 * MiB, 4096) == new[2 * MiB : 2 * MiB + 4096]


# -- the real client against the emulator ----------------------------------------------


async def test_a_body_the_server_breaks_off_is_resumed_through_the_real_client(
    emu: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The client turns a broken connection into an enosfs error (never an httpx one),
    and the cache resumes from it."""
    caplog.set_level(logging.DEBUG, logger="enosfs.blocks")
    uri = demo_files(emu)[BIG]
    ref = FileRef(emu.org, "WTG-001", "feature", uri)
    async with client_for(emu) as client:
        async with cache_on(client, block_size=1 * MiB, budget=64 * MiB) as cache:
            f = await cached(client, ref)
            emu.reset_stats()
            emu.faults({"kind": "reset", "after": 300_000, "times": 1, "match": "files.download"})
            assert await cache.read(f, 0, 4 * MiB) == emu.blob(uri)[: 4 * MiB]
        assert emu.stats()["files.download"] == 2
        assert cache.counts["resumes"] == 1
        # Resumed where it broke: every byte the cache took was a new one.
        assert cache.counts["bytes"] == 4 * MiB
        assert any("interrupted" in r.getMessage() for r in caplog.records)
