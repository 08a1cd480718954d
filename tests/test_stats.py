"""What a mount tells: the stats document assembled from each component's own part,
the Prometheus metrics read from it, and the disk cache's writes drained at unmount.
In-process, on the fake source and a cache folder in tmp_path."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest

from enosfs.blocks import BlockCache, CachedFile
from enosfs.diskcache import DiskCache, block_key
from enosfs.metrics import METRICS, families
from enosfs.readahead import MiB
from enosfs.stats import Parts, snapshot
from tests.fake_source import FakeSource

ENOSFS = Path(__file__).resolve().parent.parent / "enosfs"


def render(doc: dict[str, Any]) -> str:
    class Collector:
        def collect(self) -> Any:
            return families(doc)

    registry = CollectorRegistry()
    registry.register(Collector())
    return generate_latest(registry).decode()


def test_each_metric_name_is_written_once_in_the_source() -> None:
    names = [m.name for m in METRICS]
    assert len(set(names)) == len(names)
    source = "\n".join(p.read_text() for p in ENOSFS.rglob("*.py"))
    for name in names:
        assert len(re.findall(rf"\b{name}\b", source)) == 1, name


def test_metrics_are_read_from_the_document() -> None:
    doc = {
        "requests": {"files.download": 3, "token": 1},
        "retries": 2,
        "cache": {
            "memory": {"hits": 5, "misses": 2, "bytes": 100, "capacity": 1000},
            "verified_files": 1,
            "disk": {"dir": "/x", "hits": 7, "misses": 1, "bytes": 4096},
        },
        "in_flight": {"blocks": 1, "bytes": 999, "connections": 2},
        "kernel": {"reads": 11, "open_files": 4, "read_ahead_kb": None},
        "errors": {"EIO": 2},
        "token": {"expires_in_s": 3599.5},
    }
    lines = render(doc).splitlines()
    for line in (
        'enosfs_requests_total{kind="files.download"} 3.0',
        'enosfs_requests_total{kind="token"} 1.0',
        "enosfs_retries_total 2.0",
        "enosfs_downloaded_bytes_total 0.0",  # not in the document yet: 0
        'enosfs_cache_hits_total{tier="memory"} 5.0',
        'enosfs_cache_hits_total{tier="disk"} 7.0',
        'enosfs_cache_misses_total{tier="disk"} 1.0',
        'enosfs_cache_bytes{tier="disk"} 4096.0',
        "enosfs_inflight_bytes 999.0",
        'enosfs_errors_total{errno="EIO"} 2.0',
        "enosfs_kernel_reads_total 11.0",
        "enosfs_open_files 4.0",
        "enosfs_token_expires_in_seconds 3599.5",
        "# HELP enosfs_cache_bytes Bytes held",
        "# TYPE enosfs_cache_bytes gauge",
    ):
        assert line in lines, line
    assert not any("verified_files" in line for line in lines)
    # No token yet: its gauge is left out rather than shown as 0.
    assert "enosfs_token_expires_in_seconds" not in render({"token": {"expires_in_s": None}})


async def test_the_snapshot_is_each_components_part(tmp_path: Path) -> None:
    fake = FakeSource()
    ref = fake.add(b"x" * (3 * MiB // 2))
    disk = DiskCache(tmp_path / "cache", 64 * MiB)
    disk.open()
    try:
        async with trio.open_nursery() as nursery:
            cache = BlockCache(fake, nursery, block_size=MiB, budget=16 * MiB, disk=disk)
            f = CachedFile.of(ref, await fake.file_meta(ref))
            assert await cache.read(f, 0, 10) == b"x" * 10
            assert await disk.drain() == 0
            doc = snapshot(Parts(settings=None, mountpoint="/m", cache=cache, disk=disk))  # type: ignore[arg-type]
            nursery.cancel_scope.cancel()
    finally:
        disk.close()
    assert list(doc) == [
        "version",
        "mountpoint",
        "uptime_s",
        "time",
        "bytes_downloaded",
        "cache",
        "in_flight",
    ]
    assert doc["bytes_downloaded"] == 3 * MiB // 2
    assert list(doc["cache"]) == [
        "memory",
        "verified_files",
        "integrity_failures",
        "bad_blocks",
        "files_changed",
        "resumes",
        "read_ahead_clipped",
        "split_fetches",
        "failed_fast",
        "reader_timeouts",
        "slow_bodies",
        "reused_buffers",
        "random_reads",
        "disk",
    ]
    assert doc["cache"]["memory"]["blocks"] == 2
    assert doc["cache"]["disk"]["blocks"] == 2 and doc["cache"]["disk"]["writes"] == 2
    assert doc["in_flight"] == {"blocks": 0, "bytes": 0}


async def test_the_drain_waits_for_writes_under_way(tmp_path: Path) -> None:
    disk = DiskCache(tmp_path / "cache", 64 * MiB)
    disk.open()
    key = block_key("enos-connect://1.bin", 5, ("md5", "0" * 32), MiB, 0)

    async def slow_put(key: str, data: bytearray) -> None:
        await trio.sleep(0.3)
        await disk.put(key, data)

    try:
        async with trio.open_nursery() as nursery:
            disk.later(nursery, slow_put, key, bytearray(b"hello"))
            assert await disk.drain(timeout=30) == 0
            assert disk.has(key)
            # Once draining, no write is started.
            disk.later(nursery, disk.put, key + "x", bytearray(b"late"))
            assert not disk.has(key + "x")
    finally:
        disk.close()


async def test_the_drain_gives_up_at_its_deadline_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = DiskCache(tmp_path / "cache", 64 * MiB)
    disk.open()
    caplog.set_level(logging.INFO, "enosfs.diskcache")
    try:
        async with trio.open_nursery() as nursery:
            disk.later(nursery, trio.sleep, 60)
            with trio.fail_after(10):
                assert await disk.drain(timeout=0.1) == 1
            nursery.cancel_scope.cancel()
    finally:
        disk.close()
    said = [r.getMessage() for r in caplog.records if "dropped at unmount" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("disk cache: 1 writes dropped at unmount")
