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

Writes run in the background (later()), and an unmount waits for those under way
(drain()), a few seconds at most: a block read just before an unmount is there at
the next mount, and an unmount is never held up for long by a slow disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import struct
import zlib
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from enosfs.errors import ConfigError
from enosfs.quiet import Quieter

log = logging.getLogger(__name__)
_quiet = Quieter(log)

MAGIC = b"ENFSBLK1"
# A block of a file not yet checked against its digest is kept under its name plus this
# suffix: never served, renamed once the whole file matched, deleted at the next start.
STAGED = ".staged"
HEADER = struct.Struct(">8sIQI")  # magic, key length, payload length, crc32
LAYOUT = "v1"
DISK_PAGE = 4096
# How long an unmount waits for the writes under way before dropping the rest.
DRAIN_TIME = 5.0


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
        self._promote_later: dict[str, int] = {}  # staged name -> the CRC it must have
        self._promoting: set[str] = set()  # staged names being checked and renamed
        # Disk bytes promised to writes under way: statvfs does not see them yet, so
        # each write checks free space net of the others', under one lock.
        self._reserved = 0
        self._space = trio.Lock()
        self.counts: Counter[str] = Counter()
        self._lock_fd: int | None = None
        self._pending = 0  # writes started by later() and not finished
        self._idle = trio.Event()  # set whenever _pending falls to 0
        self._draining = False
        self._refused = 0  # writes asked for once the drain had begun

    # -- writing in the background ------------------------------------------------------

    def later(
        self, nursery: trio.Nursery, write: Callable[..., Awaitable[None]], *args: Any, **kw: Any
    ) -> None:
        """Run a write (put, promote, discard) in the background, counted so drain() can
        wait for it. Once the drain has begun none is started: the kernel is gone, and
        what the last fetches bring is not worth holding the unmount for."""
        if self._draining:
            self._refused += 1
            return
        self._pending += 1
        nursery.start_soon(self._counted, functools.partial(write, *args, **kw))

    async def _counted(self, write: Callable[[], Awaitable[None]]) -> None:
        try:
            await write()
        finally:
            self._pending -= 1
            if not self._pending:
                self._idle.set()

    async def drain(self, timeout: float = DRAIN_TIME) -> int:
        """Wait up to timeout seconds for the writes under way; return how many are
        left (they are dropped with the nursery they run in). Shielded, so an unmount
        that is itself being cancelled still waits, and never raises Cancelled: safe in
        a finally block."""
        self._draining = True
        with trio.CancelScope(deadline=trio.current_time() + timeout, shield=True):
            while self._pending:
                self._idle = trio.Event()
                await self._idle.wait()
        dropped = self._pending + self._refused
        if dropped:
            log.info(
                "disk cache: %d writes dropped at unmount (%d not done after %gs, "
                "%d asked for after the unmount)",
                dropped,
                self._pending,
                timeout,
                self._refused,
            )
        return dropped

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
                if entry.name.startswith(".tmp") or entry.name.endswith(STAGED):
                    # A write a crash interrupted, or a block whose file was never
                    # verified while the last mount ran.
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
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
            self.counts["misses"] += 1
            return None
        self.index.move_to_end(name)
        data = await trio.to_thread.run_sync(self._read, name, key, size)
        if data is None:
            self.counts["corrupt"] += 1
            _quiet.say(
                logging.WARNING, "disk cache: a damaged block was dropped and will be fetched again"
            )
            self._forget(name)
            await trio.to_thread.run_sync(self._unlink_all, [self._path(name)])
            return None
        self.counts["hits"] += 1
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

    async def put(self, key: str, data: bytearray, *, staged: bool = False) -> None:
        """Keep a block; a staged one is not served until promote() says its file
        matched its digest. Never fails: a disk that went away or filled up costs the
        cache, not the mount."""
        try:
            await self._put(key, data, staged=staged)
            late = self.name(key) + STAGED
            if staged and late in self._promote_later:
                crc = self._promote_later.pop(late)
                if late in self.index:
                    await self._promote({late: crc})
        except Exception as exc:
            self.counts["write_errors"] += 1
            if self.counts["write_errors"] == 1:
                log.warning("disk cache: cannot keep blocks (%s); carrying on without", exc)

    async def _put(self, key: str, data: bytearray, *, staged: bool = False) -> None:
        name = self.name(key)
        if name in self.index or name in self._writing:
            return
        if staged:
            # A staged copy is replaced: the latest delivery is what a pass hashes.
            name += STAGED
            if name in self._writing or name in self._promoting:
                return
            self._forget(name)
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
            self.counts["skipped_full_cache"] += 1
            return
        self.used += need
        self._writing.add(name)
        written = reserved = False
        on_disk = -(-need // DISK_PAGE) * DISK_PAGE  # a file takes whole pages
        try:
            await trio.to_thread.run_sync(self._unlink_all, doomed)
            async with self._space:
                while not await trio.to_thread.run_sync(self._space_for, on_disk + self._reserved):
                    if not self.index:
                        self.counts["skipped_full_disk"] += 1
                        return
                    await trio.to_thread.run_sync(self._unlink_all, [self._evict_one()])
                self._reserved += on_disk
                reserved = True
            written = await trio.to_thread.run_sync(self._write, name, encoded, data)
            if not written:
                self.counts["write_failed"] += 1
        finally:
            if reserved:
                self._reserved -= on_disk
            self._writing.discard(name)
            if written:
                self.index[name] = need
                self.counts["writes"] += 1
            else:
                self.used -= need

    async def promote(self, crcs: dict[str, int]) -> None:
        """These blocks' file matched its digest, and crcs holds each block's CRC-32 from
        the bytes that matched: serve the staged copies that have that CRC from now on
        (those still being written, once written); drop the others."""
        try:
            names = {}
            for key, crc in crcs.items():
                name = self.name(key) + STAGED
                if name in self._writing:
                    self._promote_later[name] = crc
                elif name in self.index:
                    names[name] = crc
            await self._promote(names)
        except Exception as exc:
            self.counts["write_errors"] += 1
            log.warning("disk cache: cannot keep verified blocks (%s)", exc)

    async def _promote(self, names: dict[str, int]) -> None:
        moves = [(self._path(n), self._path(n[: -len(STAGED)]), crc) for n, crc in names.items()]
        # No new staged copy may replace one between its check and its rename.
        self._promoting.update(names)
        try:
            done = await trio.to_thread.run_sync(_rename_matching, moves)
        finally:
            self._promoting.difference_update(names)
        for name, ok in zip(names, done, strict=True):
            size = self.index.pop(name, None)
            if size is None:
                continue  # evicted meanwhile
            if ok:
                self.index[name[: -len(STAGED)]] = size
                self.counts["verified_blocks"] += 1
            else:
                self.used -= size
                self.counts["discarded"] += 1

    async def discard(self, keys: list[str]) -> None:
        """Forget these blocks, verified or staged: their file did not match its digest."""
        paths = []
        for key in keys:
            name = self.name(key)
            for n in (name, name + STAGED):
                self._promote_later.pop(n, None)
                if n in self.index:
                    self._forget(n)
                    paths.append(self._path(n))
        self.counts["discarded"] += len(paths)
        await trio.to_thread.run_sync(self._unlink_all, paths)

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
        self.counts["evictions"] += 1
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
            _quiet.say(logging.WARNING, f"disk cache: cannot write a block: {exc.strerror}")
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False

    def _forget(self, name: str) -> None:
        size = self.index.pop(name, None)
        if size is not None:
            self.used -= size

    def stats(self) -> dict[str, Any]:
        """Its part of /.enosfs/stats, under the memory cache's."""
        return {"cache": {"disk": self._stats()}}

    def _stats(self) -> dict[str, Any]:
        return {
            "dir": str(self.root),
            "hits": self.counts["hits"],
            "misses": self.counts["misses"],
            "bytes": self.used,
            "capacity": self.capacity,
            "blocks": sum(1 for n in self.index if not n.endswith(STAGED)),
            "staged": sum(1 for n in self.index if n.endswith(STAGED)),
            "verified_blocks": self.counts["verified_blocks"],
            "discarded": self.counts["discarded"],
            "writes": self.counts["writes"],
            "evictions": self.counts["evictions"],
            "corrupt_dropped": self.counts["corrupt"],
            "skipped_full_disk": self.counts["skipped_full_disk"],
            "write_failed": self.counts["write_failed"],
        }


def _rename_matching(moves: list[tuple[Path, Path, int]]) -> list[bool]:
    """Rename each staged block whose header carries the CRC it must have; delete the
    others (a copy fetched again after the checked one was hashed)."""
    done = []
    for src, dst, crc in moves:
        try:
            with open(src, "rb") as f:
                head = f.read(HEADER.size)
            ok = len(head) == HEADER.size and HEADER.unpack(head)[3] == crc
            if ok:
                os.replace(src, dst)
            else:
                os.unlink(src)
            done.append(ok)
        except OSError:
            done.append(False)
    return done
