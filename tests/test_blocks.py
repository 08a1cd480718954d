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
        # Large ranged requests, not one per block, and little fetched beyond the reader.
        assert stats["files.download"] <= 48 // 4
        assert total <= stats["files.download.bytes"] <= total + 17 * MiB
        assert cache.counts["hits"] > 0


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
