"""Blocks on disk, under the memory LRU: a cache that survives an unmount.

Each block is one file, named by a hash of its key (fileUri, size, digest, block size,
index), written whole to a temporary name and renamed, with a header that repeats the
key and carries the payload's length and CRC-32. A block is only used if all of that
checks out on load; anything else (torn, truncated, corrupted, someone else's) is
deleted and fetched again, never served. Only files whose digest EnOS gives are cached
here, so a key always names one exact content.

The cache is bounded in bytes (least recently used go first) and never lets the disk's
free space fall below a minimum. One mount at a time owns a cache folder (an flock).
All file I/O runs in worker threads, off the trio thread that serves the kernel.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import zlib
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import trio

from enosfs.errors import ConfigError

log = logging.getLogger(__name__)

MAGIC = b"ENFSBLK1"
HEADER = struct.Struct(">8sIQI")  # magic, key length, payload length, crc32
LAYOUT = "v1"


def block_key(uri: str, size: int, digest: tuple[str, str], block_size: int, index: int) -> str:
    return f"{uri}\x00{size}\x00{digest[0]}:{digest[1]}\x00{block_size}\x00{index}"


class DiskCache:
    def __init__(self, root: Path, capacity: int, min_free: float = 0.05) -> None:
        self.root = root
        self.dir = root / LAYOUT
        self.capacity = capacity
        self.min_free = min_free
        self.index: OrderedDict[str, int] = OrderedDict()  # name -> bytes on disk, LRU order
        self.used = 0  # bytes on disk, and reserved for writes under way
        self._writing: set[str] = set()
        self.stats: Counter[str] = Counter()
        self._lock_fd: int | None = None

    # -- opening and closing -------------------------------------------------------------

    def open(self) -> None:
        """Take the folder for this mount (or say who has it) and read what is there."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cache dir {self.root}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"cache dir {self.root} is in use by another enosfs mount (pid {holder}); "
                "give each mount its own --cache-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        try:
            self._scan()
        except OSError as exc:
            self.close()
            raise ConfigError(f"cache dir {self.root}: cannot read it: {exc.strerror}") from None

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _scan(self) -> None:
        found: list[tuple[float, str, int]] = []
        for sub in self.dir.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.startswith(".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)  # a write a crash interrupted
                    continue
                st = entry.stat()
                found.append((st.st_mtime, entry.name, st.st_size))
        found.sort()
        for _, name, size in found:
            self.index[name] = size
            self.used += size
        self._unlink_all(self._evict_over(0))
        log.info(
            "disk cache %s: %d blocks, %d MiB of %d MiB",
            self.root,
            len(self.index),
            self.used >> 20,
            self.capacity >> 20,
        )

    # -- the cache -----------------------------------------------------------------------

    @staticmethod
    def name(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    def _path(self, name: str) -> Path:
        return self.dir / name[:2] / name

    def has(self, key: str) -> bool:
        return self.name(key) in self.index

    async def get(self, key: str, size: int) -> bytearray | None:
        """The block, checked; None (and the entry gone) if it is not intact."""
        name = self.name(key)
        if name not in self.index:
            self.stats["misses"] += 1
            return None
        self.index.move_to_end(name)
        data = await trio.to_thread.run_sync(self._read, name, key, size)
        if data is None:
            self.stats["corrupt"] += 1
            log.warning("disk cache: a damaged block was dropped and will be fetched again")
            self._forget(name)
            await trio.to_thread.run_sync(self._unlink_all, [self._path(name)])
            return None
        self.stats["hits"] += 1
        return data

    def _read(self, name: str, key: str, size: int) -> bytearray | None:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
                if len(head) != HEADER.size:
                    return None
                magic, key_len, length, crc = HEADER.unpack(head)
                stored_key = f.read(key_len)
                if magic != MAGIC or stored_key != key.encode("utf-8", "surrogatepass"):
                    return None
                if length != size:
                    return None
                data = bytearray(length)
                if f.readinto(data) != length or f.read(1):
                    return None
            if zlib.crc32(data) != crc:
                return None
            os.utime(path)  # recency survives a remount
            return data
        except OSError:
            return None

    async def put(self, key: str, data: bytearray) -> None:
        """Keep a block. Never fails: a disk that went away or filled up costs the
        cache, not the mount."""
        try:
            await self._put(key, data)
        except Exception as exc:
            self.stats["write_errors"] += 1
            if self.stats["write_errors"] == 1:
                log.warning("disk cache: cannot keep blocks (%s); carrying on without", exc)

    async def _put(self, key: str, data: bytearray) -> None:
        name = self.name(key)
        if name in self.index or name in self._writing:
            return
        encoded = key.encode("utf-8", "surrogatepass")
        need = HEADER.size + len(encoded) + len(data)
        if need > self.capacity:
            return
        # The index and the byte count are only ever changed here, on the trio thread,
        # and the bytes are reserved before the first await, so writes running at once
        # cannot together overrun the capacity. The threads only touch files.
        doomed = self._evict_over(need)
        if self.used + need > self.capacity:
            # What is left is being written right now: let this block go.
            await trio.to_thread.run_sync(self._unlink_all, doomed)
            self.stats["skipped_full_cache"] += 1
            return
        self.used += need
        self._writing.add(name)
        written = False
        try:
            await trio.to_thread.run_sync(self._unlink_all, doomed)
            while not await trio.to_thread.run_sync(self._space_for, need):
                if not self.index:
                    self.stats["skipped_full_disk"] += 1
                    return
                await trio.to_thread.run_sync(self._unlink_all, [self._evict_one()])
            written = await trio.to_thread.run_sync(self._write, name, encoded, data)
        finally:
            self._writing.discard(name)
            if written:
                self.index[name] = need
                self.stats["writes"] += 1
            else:
                self.used -= need

    def _evict_over(self, need: int) -> list[Path]:
        """Take least recently used blocks out of the index until need more bytes fit;
        return their paths, for a worker thread to delete."""
        doomed: list[Path] = []
        while self.index and self.used + need > self.capacity:
            doomed.append(self._evict_one())
        return doomed

    def _evict_one(self) -> Path:
        name = next(iter(self.index))
        self._forget(name)
        self.stats["evictions"] += 1
        return self._path(name)

    def _unlink_all(self, paths: list[Path]) -> None:
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _space_for(self, need: int) -> bool:
        """Would the disk keep min_free of its space free after writing need bytes?"""
        st = os.statvfs(self.dir)
        total = st.f_blocks * st.f_frsize
        return bool(total) and (st.f_bavail * st.f_frsize - need) / total >= self.min_free

    def _write(self, name: str, key: bytes, data: bytearray) -> bool:
        path = self._path(name)
        tmp = path.parent / f".tmp-{name[:16]}-{os.getpid()}"
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(HEADER.pack(MAGIC, len(key), len(data), zlib.crc32(data)))
                f.write(key)
                f.write(data)
            os.replace(tmp, path)
            return True
        except OSError as exc:
            log.warning("disk cache: cannot write a block: %s", exc.strerror)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False

    def _forget(self, name: str) -> None:
        size = self.index.pop(name, None)
        if size is not None:
            self.used -= size

    def summary(self) -> dict[str, Any]:
        return {
            "dir": str(self.root),
            "hits": self.stats["hits"],
            "misses": self.stats["misses"],
            "bytes": self.used,
            "capacity": self.capacity,
            "blocks": len(self.index),
            "writes": self.stats["writes"],
            "evictions": self.stats["evictions"],
            "corrupt_dropped": self.stats["corrupt"],
            "skipped_full_disk": self.stats["skipped_full_disk"],
        }
