"""Where news that something changed goes, and what each piece of news drops.

Three parts of the mount learn of changes, and what must go lives in other parts:

- a download finds a file is not the version it was opened as (its ETag or size moved,
  blocks.py): the file's metadata must be asked again at its next use;
- a metadata refresh finds a file's version moved (namespace.py): the old version's
  blocks and the kernel's cached pages of the file must go;
- a listing finds a name now means another file, or nothing (namespace.py), and a
  whole-file check finds the kernel's pages hold bad bytes (fs.py): the kernel must
  forget the name, or the pages.

Each part tells this one object, which does the dropping, so the whole path of an
invalidation reads in one module instead of in closures wired across `Mount.run`.
Kernel invalidations run as tasks of their own in a worker thread: from inside a
request on the same inode they could deadlock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from enosfs.blocks import BlockCache, CachedFile

if TYPE_CHECKING:
    from enosfs.api import FileMeta
    from enosfs.namespace import Dir, Expired, File, Namespace

log = logging.getLogger(__name__)


class Changes:
    """The mount's one channel for "this changed": parts report, this drops."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.cache: BlockCache | None = None
        self.ns: Namespace | None = None
        self.counts: Counter[str] = Counter()

    def stats(self) -> dict[str, Any]:
        """Its part of /.enosfs/stats: changes reported, by kind."""
        return {"changes": dict(sorted(self.counts.items()))}

    def attach(self, cache: BlockCache, ns: Namespace) -> None:
        """Wire the parts both ways: they report here, and this drops their contents."""
        self.cache, self.ns = cache, ns
        cache.changes = ns.changes = self

    # -- what the parts report ------------------------------------------------------------

    def content_changed(self, uri: str) -> None:
        """A download showed the file under uri is not the version we know: its
        metadata is checked again at its next use (which then reports version_changed)."""
        self.counts["content"] += 1
        if self.ns is not None:
            self.ns.expire(uri)

    def version_changed(self, f: File, old: FileMeta | None) -> None:
        """A file's content changed on the server: drop what we and the kernel hold of
        the old version. The kernel learns the new size from the attributes; its pages
        of the old bytes must not be served again."""
        self.counts["version"] += 1
        if self.cache is not None and old is not None and old.size is not None:
            self.cache.drop(CachedFile.of(f.ref, old))
        self.drop_pages(f.inode)

    def name_changed(self, d: Dir, name: str) -> None:
        """A name now means another file, or nothing: the kernel must look it up again."""
        self.counts["name"] += 1
        with contextlib.suppress(OSError, RuntimeError):
            # Outside a FUSE session (in-process tests) there is no kernel to tell.
            pyfuse3.invalidate_entry_async(d.inode, name.encode(), ignore_enoent=True)

    def drop_pages(self, inode: int) -> None:
        """Have the kernel drop its cached pages of an inode, open files' included."""
        self.counts["pages"] += 1
        self.nursery.start_soon(invalidate_pages, inode)

    async def refreshed(self, expired: Expired) -> None:
        """A user asked for a subtree to be asked again (`enosfs refresh`; the namespace
        has expired it): the kernel forgets its names and attributes too, before the
        user is answered, so the next access reaches the mount. In a worker thread:
        the kernel waits for lookups under way in those folders, which this loop
        serves. Pages stay: a file whose version turns out changed drops them then."""
        self.counts["refresh"] += 1
        await trio.to_thread.run_sync(forget_in_kernel, expired)


async def invalidate_pages(inode: int) -> None:
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOSYS):
            log.debug("invalidate inode %d: %s", inode, exc)


def forget_in_kernel(expired: Expired) -> None:
    """Invalidate names and attributes one by one; the kernel answers ENOENT for those
    it does not hold, and there is no kernel to tell outside a FUSE session."""
    try:
        for parent, name in expired.names:
            with contextlib.suppress(FileNotFoundError):
                pyfuse3.invalidate_entry(parent, name.encode())
        for inode in expired.inodes:
            with contextlib.suppress(FileNotFoundError):
                pyfuse3.invalidate_inode(inode, attr_only=True)
    except OSError as exc:
        log.debug("refresh: the kernel was not told (%s)", exc)
