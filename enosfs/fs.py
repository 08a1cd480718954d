"""pyfuse3 Operations: translates kernel requests into namespace and cache calls.

No network logic lives here. Each handler maps our exceptions to an errno; an
unexpected exception is logged once with its context and answered with EIO, so a bug
in one request never takes the mount down. Every write-type call fails with EROFS.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from enosfs.api import FileMeta
from enosfs.blocks import FAILURE_MEMORY, BlockCache, CachedFile
from enosfs.changes import Changes
from enosfs.config import Settings
from enosfs.errors import AuthError, DeadlineError, EnosfsError, IntegrityError, errno_of
from enosfs.firstbytes import FirstBytes
from enosfs.integrity import Reading
from enosfs.namespace import ControlFile, Dir, File, Link, Namespace, Node
from enosfs.quiet import Quieter
from enosfs.readahead import FolderReadAhead, ReadAhead
from enosfs.walkahead import IN_FLIGHT, WalkAhead

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

XATTR_PREFIX = "user.enos."
# How far past the next byte to hash a read may end and still be held for hashing: the
# kernel's parallel reads of its read-ahead window land slightly out of order.
READING_WINDOW = 16 * 1024 * 1024
# A read that waited longer than this was in trouble; the next one, likely the rest of
# the same system call, gets only what is left of the deadline. A faster one ends the
# chain.
SLOW_READ = 1.0
# The least a read in a chain of waiting ones may still wait.
MIN_WAIT = 0.25
# Served bytes not hashed yet; a read waits above this, so hashing keeps up.
MAX_HASH_BACKLOG = 16 * 1024 * 1024
# Seconds after a folder was listed during which a lookup in it is the listing's.
LISTED_LATELY = 5.0
LISTED_KEPT = 10_000  # folders whose listing time is kept (a walk's worth of seconds)
XATTR_PREFIX_B = XATTR_PREFIX.encode()


_quiet = Quieter(log)


Handler = Callable[Concatenate["EnosFS", P], Coroutine[Any, Any, R]]


def guarded(
    op: str, *, paced: bool = False, bounded: bool = True
) -> Callable[[Handler[P, R]], Handler[P, R]]:
    """Answer every failure with an errno, within the mount's deadline; log what is not
    an ordinary EnOS failure, and ordinary ones without repeating them. A paced call
    (read) keeps its own deadline, which bytes that keep coming push back (blocks.py);
    it gets only a backstop here. An unbounded one never waits, or bounds its own waits:
    a cancel scope per call is a measurable share of a walk over a big organisation,
    which costs an opendir and two readdir per folder."""

    def wrap(fn: Handler[P, R]) -> Handler[P, R]:
        @functools.wraps(fn)
        async def handler(fs: EnosFS, *args: P.args, **kwargs: P.kwargs) -> R:
            deadline = fs.read_backstop if paced else fs.op_deadline
            fs.ops[op] += 1
            try:
                if not bounded:
                    return await fn(fs, *args, **kwargs)
                with trio.fail_after(deadline):
                    return await fn(fs, *args, **kwargs)
            except pyfuse3.FUSEError as exc:
                fs.errors[errno.errorcode.get(exc.errno, str(exc.errno))] += 1
                raise
            except AuthError as exc:
                # The token task has said so, once: no line per request.
                log.debug("%s: %s", op, exc)
                fs.errors["EACCES"] += 1
                raise pyfuse3.FUSEError(errno_of(exc)) from None
            except EnosfsError as exc:
                code = errno_of(exc)
                fs.errors[errno.errorcode.get(code, str(code))] += 1
                if code == errno.ENOENT:
                    log.debug("%s: %s", op, exc)
                else:
                    _quiet.say(logging.WARNING, f"{op}: {exc}")
                raise pyfuse3.FUSEError(code) from None
            except trio.TooSlowError:
                fs.errors["ETIMEDOUT"] += 1
                _quiet.say(logging.WARNING, f"{op}: no answer within {deadline:g}s")
                raise pyfuse3.FUSEError(errno.ETIMEDOUT) from None
            except Exception:
                fs.errors["EIO"] += 1
                log.exception("%s: unexpected error (answered EIO); args %r", op, args)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return handler

    return wrap


@dataclass
class Handle:
    cached: CachedFile
    readahead: ReadAhead
    inode: int
    # Its reading did not match the file's digest: the kernel retries a failed read
    # page by page on the same handle, and no retry may succeed with the bad bytes.
    failed: bool = False
    # A large file with a digest: what this open file is served, hashed (integrity.py).
    reading: Reading | None = None
    direct: bool = False  # bypasses the kernel's page cache
    page_user: bool = False  # may fill the kernel's page cache of its inode
    judged: bool = False  # its reading's verdict was acted on
    waited: float = 0.0  # seconds its slow reads in a row have waited for bytes
    timed_out_at: float = float("-inf")  # when a slow read of it last failed


class EnosFS(pyfuse3.Operations):
    enable_writeback_cache = False
    # No POSIX ACLs: default_permissions checks mode bits, and getxattr answers ACLs
    # and labels "not supported" (see getxattr). With ACLs on, the kernel forgot each
    # inode's (absent) ACL whenever a listing refreshed its attributes and asked us
    # again for every entry of every `ls -l`.
    enable_acl = False

    def __init__(
        self,
        ns: Namespace,
        cache: BlockCache,
        settings: Settings,
        changes: Changes | None = None,
        first_bytes: FirstBytes | None = None,
    ) -> None:
        super().__init__()
        # Where a file named on its own gets its first bytes asked for (firstbytes.py).
        self.first_bytes = first_bytes
        self.ns = ns
        self.cache = cache
        self.settings = settings
        # Where what this file system learns changed goes (mount.py wires it).
        self.changes = changes or Changes(cache.nursery)
        # No FUSE call may take longer than this: the network deadline, plus a second.
        self.op_deadline = settings.timeout + 1.0
        # A read may wait longer while its bytes keep coming (a slow link, not a dead
        # one); this only stops a bug from holding a read for ever.
        self.read_backstop = 8 * self.op_deadline
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._fh = count(1)
        self.handles: dict[int, Handle] = {}
        self.dir_handles: dict[int, list[tuple[bytes, Node]]] = {}
        # The version whose pages the kernel may hold, per inode (keep_cache decisions).
        self.kernel_versions: dict[int, object] = {}
        self.counts: Counter[str] = Counter()
        # Requests from the kernel by kind: what a walk costs, as FUSE sees it (a walk
        # over a big organisation is bound by their number, not by what each does).
        self.ops: Counter[str] = Counter()
        self.readers: Counter[tuple[object, ...]] = Counter()  # open handles per file version
        self.snapshots: dict[int, bytes] = {}  # open control files: what they showed
        self.lookups: Counter[int] = Counter()  # the kernel's references, per inode
        self.errors: Counter[str] = Counter()  # errno names answered, for /.enosfs/stats
        self.folder_patterns: dict[int, FolderReadAhead] = {}
        # Listings of the next assets, for a walk over an organisation (walkahead.py).
        # Fewer in flight than the API bound's ceiling, so the user's own calls find
        # a slot.
        self.walk_ahead = WalkAhead(
            ns,
            cache.nursery,
            in_flight=max(1, min(IN_FLIGHT, settings.max_api_concurrency * 3 // 4)),
        )
        # Per inode of a large file not yet checked: open files that may fill its
        # kernel page cache (one at a time; others bypass it).
        self.page_users: Counter[int] = Counter()
        # Inodes whose kernel pages hold only checked bytes (keep_cache across opens).
        self.clean_pages: set[int] = set()
        # When each folder was last listed by opendir: lookups in it for a while after
        # are the listing's, not a file named on its own (_named_alone).
        self.listed_at: dict[int, float] = {}

    def stats(self) -> dict[str, Any]:
        """Its part of /.enosfs/stats: what the kernel asked, and what it was answered."""
        return {
            "kernel": {
                "reads": self.counts["reads"],
                "read_bytes": self.counts["read_bytes"],
                "open_files": len(self.handles),
                "ops": dict(sorted(self.ops.items())),
            },
            "whole_readings": {
                "checked": self.counts["readings_checked"],
                "broken": self.counts["readings_broken"],
            },
            "errors": dict(sorted(self.errors.items())),
            "walk_ahead": dict(sorted(self.walk_ahead.counts.items())),
            "first_bytes": self.first_bytes.stats() if self.first_bytes is not None else {},
        }

    # -- attributes ----------------------------------------------------------------------

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = self.settings.entry_timeout
        a.attr_timeout = self.settings.attr_timeout
        a.st_uid = self.uid
        a.st_gid = self.gid
        a.st_blksize = self.cache.block_size
        mtime = self.ns.mount_time_ns
        if isinstance(node, ControlFile):
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = len(node.render())
            a.entry_timeout = a.attr_timeout = 0  # it changes all the time
        elif isinstance(node, File):
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            size = node.meta.size if node.meta is not None else None
            if size is None:
                # Not asked yet (a listing does not size files): the kernel must not
                # remember this 0, so stat asks getattr, which sizes the file.
                a.attr_timeout = 0
                size = 0
            elif not self.ns.meta_fresh(node):
                # Past the TTL (say, kept from an earlier mount, as readdirplus hands it
                # out): not to be remembered; stat asks getattr, which asks EnOS.
                a.attr_timeout = 0
            a.st_size = size
            a.st_blocks = (size + 511) // 512
            if node.mtime_ms is not None:
                mtime = node.mtime_ms * 1_000_000
        elif isinstance(node, Link):
            # A link's own mode bits mean nothing on Linux; lrwxrwxrwx is what ls shows.
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_nlink = 1
            a.st_size = len(node.target.encode("utf-8"))
        else:
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
            a.st_size = 0
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime
        return a

    def _node(self, inode: int) -> Node:
        node = self.ns.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _dir(self, inode: int) -> Dir:
        node = self._node(inode)
        if not isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    async def _fresh_attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        if isinstance(node, File):
            await self.ns.file_meta(node)
        return self._attrs(node)

    # -- lookups and listings ------------------------------------------------------------

    @guarded("lookup")
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if name == b".":
            return self._attrs(parent)
        if name == b"..":
            return self._attrs(parent.parent or parent)
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return self._missing()
        node = await self.ns.lookup(parent, text)
        if node is None:
            return self._missing()
        early = self.first_bytes
        if early is not None and isinstance(node, File) and self._named_alone(node, parent):
            early.start(node.ref)  # the size and the first bytes at once (firstbytes.py)
        attrs = await self._fresh_attrs(node)
        self.lookups[node.inode] += 1
        return attrs

    def _named_alone(self, f: File, parent: Dir) -> bool:
        """Is this lookup a file named on its own (to be opened, likely), rather than one
        of a listing's names (`ls -l`, `find`), or a file whose size, and so whose
        open, is known already, or whose first block is cached?"""
        if self.ns.meta_fresh(f):
            return False
        if trio.current_time() - self.listed_at.get(parent.inode, float("-inf")) < LISTED_LATELY:
            return False
        if f.meta is None or f.meta.size is None:
            return True
        return not self.cache.has_start(CachedFile.of(f.ref, f.meta))

    def _missing(self) -> pyfuse3.EntryAttributes:
        """ENOENT that the kernel may remember for `negative_ttl` (inode 0 is FUSE's
        negative entry): shells and IDEs probe the same absent names over and over."""
        self.errors["ENOENT"] += 1
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self.settings.negative_ttl
        return a

    @guarded("getattr")
    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return await self._fresh_attrs(self._node(inode))

    @guarded("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        node = self._node(inode)
        if not isinstance(node, Link):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target.encode("utf-8")

    @guarded("opendir", bounded=False)
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        d = self._dir(inode)
        # Kept in the order listed, so the oldest go first once there are too many.
        self.listed_at.pop(inode, None)
        self.listed_at[inode] = trio.current_time()
        if len(self.listed_at) > LISTED_KEPT:
            del self.listed_at[next(iter(self.listed_at))]
        self.walk_ahead.visited(d)  # before waiting for this one, so they overlap
        entries = self.ns.listed(d)  # a walk finds most folders listed: no wait
        if entries is None:
            with trio.fail_after(self.op_deadline):
                entries = await self.ns.children(d)
        fh = next(self._fh)
        # A snapshot per handle: offsets stay valid however the listing changes.
        self.dir_handles[fh] = [
            (name.encode("utf-8"), node) for name, node in sorted(entries.items())
        ]
        return fh

    @guarded("readdir", bounded=False)  # never waits
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.dir_handles.get(fh)
        if entries is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        for i in range(start_id, len(entries)):
            name, node = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(node), i + 1):
                break
            self.lookups[node.inode] += 1  # readdirplus: the kernel now knows the entry

    async def releasedir(self, fh: int) -> None:
        self.ops["releasedir"] += 1
        self.dir_handles.pop(fh, None)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """The kernel let go of these inodes. A node that no listing shows any more
        (a file deleted or replaced on the server) can then go too: without this the
        table of nodes would only ever grow on a long-lived mount."""
        self.ops["forget"] += 1
        for inode, n in inode_list:
            left = self.lookups[inode] - n
            if left > 0:
                self.lookups[inode] = left
                continue
            self.lookups.pop(inode, None)
            self.ns.release(inode)

    # -- files ---------------------------------------------------------------------------

    @guarded("open")
    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if isinstance(node, Dir):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if isinstance(node, Link):
            raise pyfuse3.FUSEError(errno.ELOOP)  # the kernel follows links itself
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if isinstance(node, ControlFile):
            # Made now, whole; direct_io so every open shows the present state.
            fh = next(self._fh)
            self.snapshots[fh] = node.render()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        assert isinstance(node, File)
        meta = await self.ns.file_meta(node)
        if meta.size is None:
            log.warning("%s: the server does not say how large it is", node.path)
            raise pyfuse3.FUSEError(errno.EIO)
        cached = CachedFile.of(node.ref, meta)
        fh = next(self._fh)
        readahead = ReadAhead(
            initial=self.cache.block_size,
            maximum=max(self.cache.block_size, self.settings.read_ahead),
            # The kernel's parallel reads of its own window arrive slightly out of order.
            tolerance=max(1024**2, 2 * self.settings.kernel_read_ahead),
        )
        h = Handle(cached, readahead, inode, direct=self.settings.direct_io)
        self.handles[fh] = h
        self.readers[cached.key] += 1
        self._folder_read_ahead(node)
        # The kernel may keep its pages only if they are of this same version.
        keep = self.kernel_versions.get(inode, meta.version) == meta.version
        self.kernel_versions[inode] = meta.version
        if self.cache.checked_as_read(cached):
            keep = self._open_checked(h, keep)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=h.direct)

    def _open_checked(self, h: Handle, keep: bool) -> bool:
        """Set up the check of a large file's whole reading; whether the kernel may keep
        its pages. Once a reading matched, every block is checked on its own and the
        kernel's pages hold checked bytes only (see _check_reading). Until then, every
        byte this open file gets must pass through read() to be hashed: its kernel
        pages are dropped, and while another open file of the inode may be filling the
        page cache, this one bypasses it."""
        if self.cache.known_good(h.cached):
            # Every byte served from now on is checked: once the kernel's pages are
            # dropped (or known to hold checked bytes only), they stay clean.
            keep = keep and h.inode in self.clean_pages
            self.clean_pages.add(h.inode)
            return keep
        assert h.cached.digest is not None
        algorithm, want = h.cached.digest
        # The kernel keeps up to two of its read-ahead windows in flight, whose parts
        # may land in any order; a reader that skips further than this makes no claim.
        window = max(READING_WINDOW, 8 * self.settings.kernel_read_ahead)
        h.reading = Reading(algorithm, want, h.cached.size, window, self.cache.block_size)
        self.cache.readings[h.cached.key] += 1
        if h.direct:
            return keep
        if self.page_users[h.inode] > 0:
            # Bypasses the page cache, and keeps it: dropping it would make the kernel
            # read the first open file's pages again, which breaks its reading.
            h.direct = True
            return True
        h.page_user = True
        self.page_users[h.inode] += 1
        self.clean_pages.discard(h.inode)
        return False

    def _folder_read_ahead(self, f: File) -> None:
        """Prefetch the next small files of a folder being read file after file."""
        index, files = self.ns.siblings(f)
        if index < 0 or f.parent is None:
            return
        pattern = self.folder_patterns.get(f.parent.inode)
        if pattern is None:
            size = f.meta.size if f.meta is not None else None
            pattern = self.folder_patterns[f.parent.inode] = FolderReadAhead.for_files_of(size)
        span = pattern.on_open(index, len(files))
        if span is None:
            return
        todo = files[span[0] : span[1]]
        budget = self.settings.read_ahead
        for i, sibling in enumerate(todo):
            meta = sibling.meta
            if meta is None:
                # Its size is on its way (the folder's sizing batch, started by the
                # reader's first stat): fetched when it comes, not passed by for good.
                self.cache.nursery.start_soon(self._read_ahead_when_sized, todo[i:], budget)
                return
            budget = self._read_ahead_one(sibling, meta, budget)
            if budget < 0:
                return

    async def _read_ahead_when_sized(self, files: list[File], budget: int) -> None:
        """The rest of a folder read-ahead whose files' sizes were not known yet: each is
        awaited in turn (asked, or hurried, as the reader will stat it next) and its
        bytes fetched; far away, a `cp -r` started cold would otherwise fetch the first
        hundred files one round trip at a time."""
        for f in files:
            try:
                meta = await self.ns.file_meta(f)
            except EnosfsError:
                continue  # the reader's own stat says why
            budget = self._read_ahead_one(f, meta, budget)
            if budget < 0:
                return

    def _read_ahead_one(self, f: File, meta: FileMeta, budget: int) -> int:
        """Prefetch one small file within what is left of the budget; what is left then
        (negative: the budget is spent, stop)."""
        if meta.size is None or meta.size > self.cache.whole_file_limit:
            return budget
        if meta.size > budget or self.cache.inflight + meta.size > self.cache.prefetch_cap:
            return -1  # this span's budget, or the read-ahead share of all memory, is spent
        self.cache.prefetch(CachedFile.of(f.ref, meta), 0, meta.size)
        return budget - meta.size

    # pyfuse3 replies from any buffer (its stub says bytes): a block's bytes go to the
    # kernel without a copy.
    @guarded("read", paced=True)
    async def read(  # type: ignore[override]
        self, fh: int, off: int, size: int
    ) -> bytes | memoryview:
        h = self.handles.get(fh)
        if h is None:
            snapshot = self.snapshots.get(fh)
            if snapshot is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            return snapshot[off : off + size]
        if h.failed:
            raise pyfuse3.FUSEError(errno.EIO)
        self.counts["reads"] += 1
        self.counts["read_bytes"] += size
        # Blocks a sequential reader is done with can go, their bytes now in the
        # kernel's page cache; with direct_io there is no such copy: keep them.
        # Only a lone reader's blocks: another reader of the file may still need them.
        consume = h.readahead.sequential and not h.direct and self.readers[h.cached.key] == 1
        # One system call may reach us as several reads in a row (the kernel splits a
        # large read, then retries page by page): reads that each had to wait share
        # one deadline, so their waits cannot add up past it.
        started = trio.current_time()
        try:
            data = await self.cache.read(
                h.cached,
                off,
                size,
                consume=consume,
                wait_limit=max(MIN_WAIT, self.cache.wait_limit - h.waited),
                # The rest of a system call whose read just ran out of time.
                no_wait=started - h.timed_out_at < FAILURE_MEMORY,
                random_access=h.readahead.random(off, size),
            )
        except BaseException as exc:
            h.waited = 0.0
            now = trio.current_time()
            if isinstance(exc, DeadlineError) or (
                isinstance(exc, EnosfsError) and now - started > SLOW_READ
            ):
                h.timed_out_at = now  # the rest of this system call fails at once
            raise
        waited = trio.current_time() - started
        h.waited = h.waited + waited if waited > SLOW_READ else 0.0
        if h.reading is not None:
            try:
                await self._check_reading(h, off, data)
            except IntegrityError:
                # What the kernel holds of this file came from the same bad bytes, if
                # this open file put it there. If another one did (this one bypasses
                # the page cache), dropping its pages now would make the kernel read
                # them again and break that reading, which judges them itself.
                h.failed = True
                self.forget_pages(h.inode, now=h.page_user or not self.page_users[h.inode])
                raise
        ahead = h.readahead.on_read(off, size, h.cached.size)
        if ahead is not None:
            reached = self.cache.prefetch(h.cached, *ahead, request=h.readahead.request)
            if reached < ahead[1]:
                h.readahead.clipped(reached)
        return data

    async def _check_reading(self, h: Handle, off: int, data: bytes | memoryview) -> None:
        """Hash what this read serves; the read that completes a whole reading waits for
        the verdict, and fails unless it matches."""
        reading = h.reading
        assert reading is not None
        if reading.ok is not None:
            return
        reading.served(off, data, self.cache.nursery)
        while reading.backlog > MAX_HASH_BACKLOG:
            await reading.hashed_some()  # what is queued pins cache blocks
        if not reading.complete:
            return
        verdict = await reading.result()
        if verdict is None or h.judged:
            return
        h.judged = True  # two reads may both complete it; one verdict
        if verdict:
            await self.cache.matched(h.cached, reading.block_crcs())
            if h.page_user:
                # The kernel's pages are what this reading was served (other open files
                # bypass them), and that matched. Pages another open file put there
                # are not dropped now, which would break its reading: the next open
                # that is not sure they are clean drops them.
                self.clean_pages.add(h.inode)
            return
        raise self.cache.corrupt(h.cached)

    def forget_pages(self, inode: int, *, now: bool = True) -> None:
        """Have the kernel drop its cached pages of a file: the next open does not keep
        them, and with now, open files lose them at once too."""
        self.kernel_versions.pop(inode, None)
        self.clean_pages.discard(inode)
        if now:
            self.changes.drop_pages(inode)

    async def release(self, fh: int) -> None:
        self.snapshots.pop(fh, None)
        h = self.handles.pop(fh, None)
        if h is not None:
            if h.reading is not None:
                self.cache.readings[h.cached.key] -= 1
                if self.cache.readings[h.cached.key] <= 0:
                    del self.cache.readings[h.cached.key]
                if h.reading.broken:
                    self.counts["readings_broken"] += 1
                elif h.reading.ok is not None:
                    self.counts["readings_checked"] += 1
            if h.page_user:
                self.page_users[h.inode] -= 1
                if self.page_users[h.inode] <= 0:
                    del self.page_users[h.inode]
            self.readers[h.cached.key] -= 1
            if self.readers[h.cached.key] <= 0:
                del self.readers[h.cached.key]

    async def flush(self, fh: int) -> None:
        return None

    # -- the rest ------------------------------------------------------------------------

    @guarded("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        bs = self.cache.block_size
        total = sum(f.meta.size or 0 for f in self.ns.all_files() if f.meta is not None)
        s.f_bsize = bs
        s.f_frsize = bs
        s.f_blocks = (total + bs - 1) // bs
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.ns.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    def _xattrs(self, node: Node) -> dict[str, str]:
        if not isinstance(node, File):
            return {}
        out: dict[str, Any] = {
            "uri": node.ref.uri,
            "asset": node.ref.asset,
            "category": node.ref.category,
            "org": node.ref.org,
        }
        if not node.ref.asset:  # a device known by its keys alone
            out.update(product_key=node.ref.product_key, device_key=node.ref.device_key)
            del out["asset"]
        for key in ("feature", "feature_type", "firmware_id", "firmware", "version"):
            if node.origin.get(key):
                out[key] = node.origin[key]
        m = node.meta
        if m is not None:
            for key, value in (
                ("md5", m.md5),
                ("sign_method", m.sign_method),
                ("sign", m.sign),
                ("original_name", m.original_name),
            ):
                if value:
                    out[key] = value
            if m.create_time_ms is not None:
                out["created"] = str(m.create_time_ms)
        return {XATTR_PREFIX + k: str(v) for k, v in out.items()}

    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        # `ls -l` asks every entry for its SELinux label and its ACL. Neither is
        # supported here, and saying so (ENOTSUP, not "this one has none") lets ls
        # stop asking for the rest of the mount: a round trip or two less an entry.
        if name.startswith((b"security.", b"system.", b"trusted.")):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if not name.startswith(XATTR_PREFIX_B):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return await self._getxattr(inode, name)

    @guarded("getxattr")
    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        value = self._xattrs(self._node(inode)).get(name.decode("utf-8", "replace"))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode("utf-8")

    @guarded("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> list[bytes]:
        return [k.encode("utf-8") for k in sorted(self._xattrs(self._node(inode)))]

    # -- everything that would change something ------------------------------------------

    async def _read_only(self, *args: object, **kwargs: object) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = _read_only
    mknod = _read_only
    mkdir = _read_only
    unlink = _read_only
    rmdir = _read_only
    symlink = _read_only
    rename = _read_only
    link = _read_only
    write = _read_only
    create = _read_only
    setxattr = _read_only
    removexattr = _read_only
