"""The disk cache on its own, on real filesystems: free space, damaged blocks, logs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from enosfs import diskcache
from enosfs.diskcache import DiskCache
from tests.support import tmpfs_at

MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs of our own, so "the disk is nearly full" is real and cheap."""
    if os.getuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs_at(tmp_path / "small", "20m") as where:
        yield where


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


async def test_concurrent_writes_never_eat_into_min_free(small_disk: Path) -> None:
    """60 blocks of 1 MiB written at once on a 20 MiB disk that must keep 25 % free:
    each write counts the others' reservations, so the floor holds and none hits ENOSPC."""
    cache = DiskCache(small_disk / "cache", capacity=1024 * MiB, min_free=0.25)
    cache.open()
    floor = 0.25 * os.statvfs(small_disk).f_blocks * os.statvfs(small_disk).f_frsize
    lowest = free_bytes(small_disk)
    done = False

    async def watch() -> None:
        nonlocal lowest
        while not done:
            lowest = min(lowest, free_bytes(small_disk))
            await trio.sleep(0)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as writers:
                for i in range(60):
                    writers.start_soon(cache.put, f"block {i}", bytearray([i]) * MiB)
            done = True
    finally:
        cache.close()
    lowest = min(lowest, free_bytes(small_disk))
    assert cache.counts["write_failed"] == 0, cache.counts
    assert cache.counts["writes"] >= 5
    assert lowest >= floor, f"free space fell to {lowest} below the floor {floor:.0f}"
    # What is indexed is on disk and intact.
    for i in range(60):
        name = DiskCache.name(f"block {i}")
        if name in cache.index:
            assert await cache.get(f"block {i}", MiB) == bytearray([i]) * MiB


@pytest.mark.allow_warnings(r"damaged block")
async def test_many_damaged_blocks_give_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = DiskCache(tmp_path / "cache", capacity=64 * MiB)
    cache.open()
    try:
        for i in range(50):
            await cache.put(f"block {i}", bytearray([i]) * 4096)
        for path in (tmp_path / "cache").rglob("*"):
            if path.is_file() and path.parent.parent.name == "v1":
                data = bytearray(path.read_bytes())
                data[-1] ^= 0xFF
                path.write_bytes(bytes(data))
        diskcache._quiet.last.clear()  # earlier tests in this process may have spoken
        with caplog.at_level(logging.INFO, logger="enosfs.diskcache"):
            for i in range(50):
                assert await cache.get(f"block {i}", 4096) is None
    finally:
        cache.close()
    assert cache.counts["corrupt"] == 50
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
