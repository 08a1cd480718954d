"""The tree /ORG/ASSET/CATEGORY/FILE: nodes, names and freshness over the catalog.

What exists comes from the catalog (catalog.py); this module gives it inodes, settles
its names and decides when to ask again.

Folders are listed lazily and kept for `metadata_ttl` seconds; a listing that cannot be
refreshed is served stale (and said so in the log) rather than failing, so `ls` of what
was seen keeps working while the backend is away. A file's node keeps its identity (and
so its inode) while its fileUri stays the same; a new fileUri under the same name is a
new node, so the kernel never mixes the pages of two files.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import count

import trio

from enosfs.api import BadRecord, EnosClient, FileMeta, FileRef
from enosfs.catalog import Catalog, Entry, KnownMeta
from enosfs.config import CATEGORIES, Settings
from enosfs.errors import EnosfsError, NotFound, TransportError
from enosfs.naming import safe_name, settle, uri_id

log = logging.getLogger(__name__)

ROOT_INODE = 1


class DirKind(enum.Enum):
    """What a folder stands for, and so how it is listed."""

    ROOT = "root"
    ORG = "org"
    ASSET = "asset"
    CATEGORY = "category"
    CONTROL = "control"


@dataclass(eq=False)
class Node:
    inode: int
    name: str
    parent: Dir | None

    @property
    def path(self) -> str:
        parts: list[str] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(parts))


@dataclass(eq=False)
class Dir(Node):
    kind: DirKind
    org: str = ""
    asset: str = ""
    category: str = ""
    children: dict[str, Node] | None = None
    hidden: dict[str, Node] = field(default_factory=dict)
    missing: dict[str, float] = field(default_factory=dict)
    loaded_at: float = float("-inf")
    refreshing: trio.Event | None = None  # set when the refresh under way ends
    refresh_error: EnosfsError | None = None
    # The files in listing order, for read-ahead across files (see Namespace.siblings).
    order: list[File] = field(default_factory=list)
    position: dict[int, int] = field(default_factory=dict)
    order_of: dict[str, Node] | None = None


@dataclass(eq=False)
class File(Node):
    ref: FileRef
    meta: FileMeta | None = None
    meta_at: float = float("-inf")
    # Where the file came from, for xattrs.
    origin: dict[str, str] = field(default_factory=dict)
    mtime_ms: int | None = None


@dataclass(eq=False)
class ControlFile(Node):
    """A file of the mount's own state (/.enosfs/stats ...): made when opened."""

    render: Callable[[], bytes] = field(default=lambda: b"")


CONTROL_DIR = ".enosfs"


class Namespace:
    def __init__(
        self,
        client: EnosClient,
        settings: Settings,
        *,
        on_version_change: Callable[[File, FileMeta | None], None] | None = None,
        on_entry_change: Callable[[Dir, str], None] | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.catalog = Catalog(client, settings, clock=clock)
        self.settings = settings
        self.ttl = settings.metadata_ttl
        self.clock = clock
        self.on_version_change = on_version_change
        self.on_entry_change = on_entry_change
        self.mount_time_ns = time.time_ns()
        self._inodes = count(ROOT_INODE + 1)
        self.nodes: dict[int, Node] = {}
        self.root = Dir(ROOT_INODE, "", None, DirKind.ROOT)
        self.nodes[ROOT_INODE] = self.root
        self.control: Dir | None = None
        # Where listings run (the mount's nursery); None: in the caller (tests).
        self.nursery: trio.Nursery | None = None

    # -- nodes ---------------------------------------------------------------------------

    def _new_dir(
        self,
        name: str,
        parent: Dir,
        kind: DirKind,
        org: str = "",
        asset: str = "",
        category: str = "",
    ) -> Dir:
        d = Dir(next(self._inodes), name, parent, kind, org=org, asset=asset, category=category)
        self.nodes[d.inode] = d
        return d

    def _new_file(self, name: str, parent: Dir, entry: Entry) -> File:
        ref = FileRef(parent.org, parent.asset, parent.category, entry.uri)
        f = File(
            next(self._inodes), name, parent, ref, origin=entry.origin, mtime_ms=entry.mtime_ms
        )
        if entry.meta is not None:
            f.meta, f.meta_at = entry.meta, self.clock()
        self.nodes[f.inode] = f
        return f

    def get(self, inode: int) -> Node | None:
        return self.nodes.get(inode)

    # -- listing -------------------------------------------------------------------------

    async def children(self, d: Dir) -> dict[str, Node]:
        """The folder's entries, refreshed when older than the TTL.

        A refresh runs as a task of the mount's own (one per folder, however many
        callers want it), not in the caller: a caller that gives up at its deadline
        does not take a half-done listing of a large folder down with it, and the next
        caller finds it finished.
        """
        if self.fresh(d):
            assert d.children is not None
            return d.children
        done = d.refreshing
        if done is None:
            done = d.refreshing = trio.Event()
            if self.nursery is not None:
                self.nursery.start_soon(self._refresh, d, done)
            else:
                await self._refresh(d, done)
        await done.wait()
        if d.children is None:
            assert d.refresh_error is not None
            raise d.refresh_error.with_traceback(None)
        return d.children

    async def _refresh(self, d: Dir, done: trio.Event) -> None:
        try:
            d.children = await self._list(d)
            d.loaded_at = self.clock()
            d.refresh_error = None
        except Exception as exc:
            if not isinstance(exc, EnosfsError):
                log.exception("%s: listing failed unexpectedly", d.path)
                exc = TransportError(f"{d.path}: listing failed ({type(exc).__name__})")
            d.refresh_error = exc
            if d.children is not None:
                log.warning("%s: cannot refresh listing, serving the last one: %s", d.path, exc)
                # Try again soon, not at every call.
                d.loaded_at = self.clock() - self.ttl + min(self.ttl, 5.0)
        finally:
            d.refreshing = None
            done.set()

    async def lookup(self, d: Dir, name: str) -> Node | None:
        entries = await self.children(d)
        node = entries.get(name) or d.hidden.get(name)
        if node is not None:
            return node
        if d.kind is DirKind.CATEGORY:
            for child in entries.values():
                if isinstance(child, File) and uri_id(child.ref.uri) == name:
                    return child
        if d.kind not in (DirKind.ORG, DirKind.CATEGORY):
            return None
        seen_missing = d.missing.get(name)
        if seen_missing is not None and self.clock() - seen_missing < self.ttl:
            return None
        node = await self._lookup_unlisted(d, name)
        if node is None:
            if len(d.missing) > 1000:
                now = self.clock()
                d.missing = {k: t for k, t in d.missing.items() if now - t < self.ttl}
            d.missing[name] = self.clock()
        else:
            d.hidden[name] = node
        return node

    async def _lookup_unlisted(self, d: Dir, name: str) -> Node | None:
        """An asset or file that no listing shows but that a user can name."""
        if d.kind is DirKind.ORG:
            if not await self.catalog.has_asset(d.org, name):
                return None
            return self._asset_dir(d, name)
        entry = await self.catalog.unlisted_file(d.org, d.asset, d.category, name)
        if entry is None:
            return None
        return self._new_file(name, d, entry)

    async def _list(self, d: Dir) -> dict[str, Node]:
        old = d.children or {}
        if d.kind is DirKind.ROOT:
            out = {
                o.org_id: old.get(o.org_id) or self._new_dir(o.org_id, d, DirKind.ORG, org=o.org_id)
                for o in self.settings.orgs
            }
            if self.control is not None:
                out[CONTROL_DIR] = self.control
            return out
        if d.kind is DirKind.ORG:
            return self._place_assets(d, await self.catalog.asset_ids(d.org), old)
        if d.kind is DirKind.ASSET:
            return {
                c: old.get(c)
                or self._new_dir(c, d, DirKind.CATEGORY, org=d.org, asset=d.asset, category=c)
                for c in CATEGORIES
            }
        entries = await self.catalog.entries(
            d.org, d.asset, d.category, known=self._known_meta(d), where=d.path
        )
        return self._place(d, entries, old)

    def _known_meta(self, d: Dir) -> KnownMeta:
        """The records the folder's files hold that are still fresh, by fileUri: a
        refresh need not ask getFileInfo again for those. Freshness is judged when the
        catalog asks, not now, as the listing before it may take a while."""
        by_uri = {c.ref.uri: c for c in (d.children or {}).values() if isinstance(c, File)}

        def known(uri: str) -> FileMeta | None:
            f = by_uri.get(uri)
            if f is not None and f.meta is not None and self.clock() - f.meta_at < self.ttl:
                return f.meta
            return None

        return known

    def _asset_dir(self, org_dir: Dir, asset_id: str, name: str | None = None) -> Dir:
        return self._new_dir(
            name or safe_name(asset_id), org_dir, DirKind.ASSET, org=org_dir.org, asset=asset_id
        )

    def _place_assets(self, d: Dir, asset_ids: list[str], old: dict[str, Node]) -> dict[str, Node]:
        """Folder names for asset ids, settled as file names are ('a/b' and 'a_b' both
        want 'a_b'). An id that is its own safe name keeps it, so a plain id never moves
        because an odd one appeared; a folder keeps its node while its name still means
        the same asset, and the kernel is told to forget a name that now means another."""
        wanted = [safe_name(a) for a in asset_ids]
        names = settle(
            ((w, ("0" if w == a else "1", a)) for w, a in zip(wanted, asset_ids, strict=True)),
            extensions=False,
        )
        out: dict[str, Node] = {}
        for name, asset_id in zip(names, asset_ids, strict=True):
            node = old.get(name)
            if not (isinstance(node, Dir) and node.asset == asset_id):
                hidden = d.hidden.get(name)
                if isinstance(hidden, Dir) and hidden.asset == asset_id:
                    node = d.hidden.pop(name)
                else:
                    if name in old:
                        self._entry_changed(d, name)
                    node = self._asset_dir(d, asset_id, name)
            out[name] = node
        for name in old.keys() - out.keys():
            self._entry_changed(d, name)
        return out

    def _place(self, d: Dir, entries: list[Entry], old: dict[str, Node]) -> dict[str, Node]:
        """Settle names; keep a node (and its inode) where name and fileUri are unchanged."""
        names = settle((e.wanted, e.key) for e in entries)
        out: dict[str, Node] = {}
        for name, entry in zip(names, entries, strict=True):
            prev = old.get(name)
            if isinstance(prev, File) and prev.ref.uri == entry.uri:
                if entry.meta is not None:
                    self._set_meta(prev, entry.meta)
                prev.origin, prev.mtime_ms = entry.origin, entry.mtime_ms or prev.mtime_ms
                out[name] = prev
            else:
                out[name] = self._new_file(name, d, entry)
                if prev is not None:
                    self._entry_changed(d, name)
        for name in old.keys() - out.keys():
            self._entry_changed(d, name)
        return out

    def _entry_changed(self, d: Dir, name: str) -> None:
        """A name now means another file, or nothing: the kernel must forget it."""
        if self.on_entry_change is not None:
            self.on_entry_change(d, name)

    # -- file metadata -------------------------------------------------------------------

    def _set_meta(self, f: File, meta: FileMeta) -> None:
        old = f.meta
        f.meta, f.meta_at = meta, self.clock()
        if old is not None and old.version != meta.version:
            log.info("%s changed on the server (size %s -> %s)", f.path, old.size, meta.size)
            if self.on_version_change is not None:
                self.on_version_change(f, old)

    async def file_meta(self, f: File) -> FileMeta:
        """The file's metadata, fetched again when older than the TTL."""
        if f.meta is not None and self.clock() - f.meta_at < self.ttl:
            return f.meta
        try:
            meta = await self.catalog.file_meta(f.ref)
        except (NotFound, BadRecord):
            raise  # the last good record would no longer be true
        except EnosfsError:
            if f.meta is not None:
                return f.meta  # stale but known; the read path checks sizes again
            raise
        self._set_meta(f, meta)
        return meta

    def release(self, inode: int) -> None:
        """Forget a node the kernel no longer knows, unless a listing still shows it."""
        node = self.nodes.get(inode)
        if node is None or node.parent is None or isinstance(node, ControlFile):
            return
        d = node.parent
        listed = d.children is not None and d.children.get(node.name) is node
        if (
            listed
            or d.hidden.get(node.name) is node
            or (isinstance(node, Dir) and node.kind in (DirKind.ORG, DirKind.CONTROL))
        ):
            return
        del self.nodes[inode]

    def add_control(self, files: dict[str, Callable[[], bytes]]) -> None:
        """The read-only folder /.enosfs that shows the mount's own state."""
        d = self._new_dir(CONTROL_DIR, self.root, DirKind.CONTROL)
        d.children = {}
        for name, render in files.items():
            node = ControlFile(next(self._inodes), name, d, render=render)
            self.nodes[node.inode] = node
            d.children[name] = node
        self.control = d

    def fresh(self, d: Dir) -> bool:
        return d.children is not None and (
            d.kind is DirKind.CONTROL or self.clock() - d.loaded_at < self.ttl
        )

    def expire(self, uri: str) -> None:
        """A download showed this file changed: check its metadata again at next use."""
        for f in self.all_files():
            if f.ref.uri == uri:
                f.meta_at = float("-inf")

    def siblings(self, f: File) -> tuple[int, list[File]]:
        """f's position among the files of its folder, in listing order."""
        d = f.parent
        if d is None or d.children is None:
            return -1, []
        if d.order_of is not d.children:
            d.order = [n for _, n in sorted(d.children.items()) if isinstance(n, File)]
            d.position = {n.inode: i for i, n in enumerate(d.order)}
            d.order_of = d.children
        return d.position.get(f.inode, -1), d.order

    def all_files(self) -> Iterable[File]:
        return (n for n in self.nodes.values() if isinstance(n, File))
