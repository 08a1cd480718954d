"""Layer 3: the block cache and read-ahead against the emulator, counting requests."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from enosfs.api import FileRef
from enosfs.blocks import BlockCache, CachedFile
from enosfs.errors import IntegrityError
from enosfs.readahead import MiB, ReadAhead
from tests.support import Emulator, demo_files
from tests.test_client import client_for

BIG = "WTG-001/feature/vibration_raw.bin"


@asynccontextmanager
async def cache_for(emu: Emulator, **kw: int) -> AsyncIterator[BlockCache]:
    async with client_for(emu) as client, trio.open_nursery() as nursery:
        yield BlockCache(client, nursery, **kw)
        nursery.cancel_scope.cancel()


async def big_file(emu: Emulator, cache: BlockCache) -> tuple[CachedFile, bytes]:
    uri = demo_files(emu)[BIG]
    ref = FileRef(emu.org, "WTG-001", "feature", uri)
    meta = await cache.client.file_meta(ref)
    assert meta.size is not None
    return CachedFile.of(ref, meta), emu.blob(uri)


def downloaded(emu: Emulator) -> int:
    return emu.stats().get("files.download.bytes", 0)


async def test_reads_are_exact_across_block_boundaries(emu: Emulator) -> None:
    async with cache_for(emu, block_size=64 * 1024, budget=4 * MiB) as cache:
        f, want = await big_file(emu, cache)
        rnd = random.Random(7)
        cases = [(64 * 1024 - 1, 2), (0, 1), (f.size - 10, 100), (f.size, 10), (f.size - 1, 1)]
        cases += [
            (rnd.randrange(f.size), rnd.choice([1, 100, 4096, 65536, 300_000])) for _ in range(200)
        ]
        for off, n in cases:
            got = await cache.read(f, off, n)
            assert got == want[off : off + n], (off, n)


async def test_single_flight_under_16_concurrent_readers(emu: Emulator) -> None:
    async with cache_for(emu, block_size=1 * MiB, budget=64 * MiB) as cache:
        f, want = await big_file(emu, cache)
        emu.reset_stats()
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
        assert downloaded(emu) <= span
        # At most two requests a block (a read deep in a block fetches its tail first).
        assert cache.stats["fetches"] <= 2 * 8


async def test_sequential_reader_gets_growing_readahead(emu: Emulator) -> None:
    async with cache_for(emu, block_size=1 * MiB, budget=128 * MiB) as cache:
        f, want = await big_file(emu, cache)
        emu.reset_stats()
        ra = ReadAhead(initial=1 * MiB, maximum=16 * MiB)
        off, step, total = 0, 128 * 1024, 48 * MiB
        while off < total:
            assert await cache.read(f, off, step) == want[off : off + step]
            ahead = ra.on_read(off, step, f.size)
            if ahead:
                cache.prefetch(f, *ahead)
            off += step
        assert ra.window == 16 * MiB
        stats = emu.stats()
        # Large ranged requests, not one per block, and little fetched beyond the reader.
        assert stats["files.download"] <= 48 // 4
        assert total <= stats["files.download.bytes"] <= total + 17 * MiB
        assert cache.stats["hits"] > 0


async def test_random_reader_fetches_only_what_it_reads(emu: Emulator) -> None:
    async with cache_for(emu, block_size=256 * 1024, budget=64 * MiB) as cache:
        f, want = await big_file(emu, cache)
        emu.reset_stats()
        ra = ReadAhead()
        rnd = random.Random(3)
        blocks = set()
        for _ in range(100):
            off = rnd.randrange(f.size - 4096)
            assert await cache.read(f, off, 4096) == want[off : off + 4096]
            blocks.update({off // cache.block_size, (off + 4095) // cache.block_size})
            ahead = ra.on_read(off, 4096, f.size)
            assert ahead is None
        assert downloaded(emu) <= len(blocks) * cache.block_size
        # A read deep in a block fetches the block's tail first, then its head.
        assert emu.stats()["files.download"] <= 2 * len(blocks)
        assert cache.stats["split_fetches"] > 0


async def test_memory_budget_holds(emu: Emulator) -> None:
    budget = 8 * MiB
    async with cache_for(emu, block_size=1 * MiB, budget=budget) as cache:
        f, want = await big_file(emu, cache)
        for off in range(0, 64 * MiB, 1 * MiB):
            assert await cache.read(f, off, 4096) == want[off : off + 4096]
            assert cache.lru.currsize <= budget
        assert len(cache.lru) <= 8


async def test_server_ignoring_range_still_serves_correct_bytes(emu: Emulator) -> None:
    emu.switches(honour_range=False)
    async with cache_for(emu, block_size=1 * MiB, budget=256 * MiB) as cache:
        f, want = await big_file(emu, cache)
        emu.reset_stats()
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
        assert emu.stats()["files.download.full"] == 1
        assert len(cache.flights) == 0


async def test_small_file_in_one_request(emu: Emulator) -> None:
    async with cache_for(emu, block_size=64 * 1024, budget=16 * MiB) as cache:
        path, uri = next(
            (p, u) for p, u in demo_files(emu).items() if p.endswith("scada_export.csv")
        )
        ref = FileRef(emu.org, path.split("/")[0], "feature", uri)
        meta = await cache.client.file_meta(ref)
        assert meta.size is not None and meta.size > 64 * 1024
        f = CachedFile.of(ref, meta)
        emu.reset_stats()
        want = emu.blob(uri)
        out = b"".join([await cache.read(f, off, 4096) for off in range(0, f.size, 4096)])
        assert out == want
        assert emu.stats()["files.download"] == 1


async def test_memory_budget_holds_with_50_sequential_readers(emu: Emulator) -> None:
    """50 files read at once, each wanting up to 16 MiB of read-ahead: the read-ahead
    share of the budget clips them, and block memory stays within the budget."""
    budget = 32 * MiB
    async with cache_for(emu, block_size=1 * MiB, budget=budget) as cache:
        f, want = await big_file(emu, cache)
        peak = 0
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
        assert cache.stats["readahead_clipped"] > 0
        # Demand reads are never held back: 50 readers may each wait on one block.
        assert peak <= budget + 50 * cache.block_size
        assert cache.lru.currsize <= budget
        assert cache.inflight == 0 and not cache.flights


async def test_a_small_file_partly_evicted_is_checked_whole_again(emu: Emulator) -> None:
    files = demo_files(emu)
    rel = next(r for r in files if r.endswith("turbine-controller-4.1.0.bin"))
    asset, category, _ = rel.split("/")
    ref = FileRef(emu.org, asset, category, files[rel])
    async with cache_for(emu, block_size=1 * MiB, budget=64 * MiB) as cache:
        meta = await cache.client.file_meta(ref)
        f = CachedFile.of(ref, meta)
        want = emu.blob(files[rel])
        assert 2 * MiB < f.size <= cache.whole_file_limit
        assert await cache.read(f, 0, f.size) == want
        del cache.lru[(*f.key, 1)]  # evicted, as a busy cache does
        emu.faults({"kind": "corrupt", "after": 1234, "match": "files.download"})
        # Block 1 comes again with a bad byte: the file is checked whole, not served.
        with pytest.raises(IntegrityError):
            await cache.read(f, MiB, 4096)
        emu.admin("DELETE", "faults")
        cache.failures.clear()
        assert await cache.read(f, MiB, 4096) == want[MiB : MiB + 4096]
