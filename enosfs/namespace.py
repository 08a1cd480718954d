"""The tree /ORG/ASSET/CATEGORY/FILE: nodes, names and freshness over the catalog.

What exists comes from the catalog (catalog.py); this module gives it inodes, settles
its names and decides when to ask again.

Folders are listed lazily and kept for `metadata_ttl` seconds; a listing that cannot be
refreshed is served stale (and said so in the log) rather than failing, so `ls` of what
was seen keeps working while the backend is away. A listing leaves its files unsized;
the first file of a folder whose attributes are asked for has the whole folder sized
(`ls -l` asks for every entry next). A name found missing is remembered as missing for
`negative_ttl` seconds: shells and IDEs probe the same absent names again and again.

A file's node keeps its identity (and so its inode) while its fileUri stays the same; a
new fileUri under the same name is a new node, so the kernel never mixes the pages of
two files.

Beside its asset folders, an organisation shows by-name/ and by-key/ (views.py):
folders of symbolic links to them, made by the organisation's own listing and fresh
exactly as long as it is.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING

import trio

from enosfs.api import BadRecord, FileMeta, FileRef
from enosfs.catalog import Catalog, Entry
from enosfs.config import CATEGORIES, Settings
from enosfs.errors import EnosfsError, NotFound, TransportError
from enosfs.naming import safe_name, settle, uri_id
from enosfs.priority import Ahead, current, needed, speculative, urgent
from enosfs.source import Listings
from enosfs.views import BY_KEY, BY_NAME, VIEW_NAMES, Known, by_key, by_name

if TYPE_CHECKING:
    from enosfs.changes import Changes

log = logging.getLogger(__name__)

ROOT_INODE = 1
# A file whose sizing failed this recently is left out of the batches its siblings'
# attributes start, so a folder of failing files does not cost a batch per file; its
# own getattr still asks at once.
RETRY_SIZE_AFTER = 5.0
# A walk that asked for a size this recently is taken to want sizes of what is ahead.
SIZES_WANTED_FOR = 10.0


class DirKind(enum.Enum):
    """What a folder stands for, and so how it is listed."""

    ROOT = "root"
    ORG = "org"
    ASSET = "asset"
    CATEGORY = "category"
    CONTROL = "control"
    BY_NAME = "by-name"  # /ORG/by-name: links named by deviceName
    BY_KEY = "by-key"  # /ORG/by-key: a folder per product key
    PRODUCT = "product"  # /ORG/by-key/PRODUCT_KEY: links named by device key


# Folders the organisation's listing fills (views.py): no listing of their own.
VIEW_KINDS = frozenset({DirKind.BY_NAME, DirKind.BY_KEY, DirKind.PRODUCT})


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
    # (product key, device key) of a device known by nothing else (asset ""): views.py.
    keys: tuple[str, str] | None = None
    children: dict[str, Node] | None = None
    hidden: dict[str, Node] = field(default_factory=dict)
    missing: dict[str, float] = field(default_factory=dict)
    loaded_at: float = float("-inf")
    refreshing: trio.Event | None = None  # set when the refresh under way ends
    # Whether someone waits for that refresh (None) or it was started ahead (priority.py).
    refresh_standing: Ahead | None = None
    refresh_error: EnosfsError | None = None
    # The files in listing order, for read-ahead across files (see Namespace.siblings).
    order: list[File] = field(default_factory=list)
    position: dict[int, int] = field(default_factory=dict)
    order_of: dict[str, Node] | None = None
    # Sizing of its files under way: inode -> the batch that covers it (single flight).
    sizing: dict[int, Sizing] = field(default_factory=dict)
    size_failed_at: dict[int, float] = field(default_factory=dict)  # inode -> when
    # Files sizing found gone or impossible: inode -> (when, why), so that the `ls -l`
    # that listed them hears why at once instead of asking again.
    dropped: dict[int, tuple[float, EnosfsError]] = field(default_factory=dict)


@dataclass(eq=False)
class Sizing:
    """One batch of getFileInfo for a folder: callers wanting one of its files wait for
    that file's answer (not the whole batch's: opening one file of a folder of hundreds
    costs one round trip), then read its record from the node, or its failure from here."""

    done: trio.Event = field(default_factory=trio.Event)
    failed: dict[int, EnosfsError] = field(default_factory=dict)
    settled: set[int] = field(default_factory=set)  # inodes whose answer came
    waiting: dict[int, trio.Event] = field(default_factory=dict)
    # fileUri -> the standing of its call, for those asked ahead of need (priority.py):
    # a caller that comes to wait for one hurries it.
    standing: dict[str, Ahead] = field(default_factory=dict)

    def settle(self, inode: int) -> None:
        self.settled.add(inode)
        event = self.waiting.pop(inode, None)
        if event is not None:
            event.set()

    def finish(self) -> None:
        self.done.set()
        for event in self.waiting.values():
            event.set()
        self.waiting.clear()

    async def wait_for(self, inode: int) -> None:
        if inode in self.settled or self.done.is_set():
            return
        await self.waiting.setdefault(inode, trio.Event()).wait()


@dataclass(eq=False)
class File(Node):
    ref: FileRef
    meta: FileMeta | None = None
    meta_at: float = float("-inf")
    # Where the file came from, for xattrs.
    origin: dict[str, str] = field(default_factory=dict)
    mtime_ms: int | None = None


@dataclass(eq=False)
class Link(Node):
    """A symbolic link of a view to an asset folder: `target` is relative ("../A"), so
    it stays right wherever the mount is."""

    target: str
    asset: str


@dataclass(eq=False)
class ControlFile(Node):
    """A file of the mount's own state (/.enosfs/stats ...): made when opened."""

    render: Callable[[], bytes] = field(default=lambda: b"")


CONTROL_DIR = ".enosfs"


@dataclass
class Expired:
    """What `Namespace.refresh` made stale, for the kernel to forget too: the names it
    holds of files (and of names found missing), and the attributes of those files.
    Folder names are left alone: a folder keeps its node, and dropping its name would
    break the working directory of a shell inside it."""

    names: list[tuple[int, str]] = field(default_factory=list)  # (folder inode, name)
    inodes: list[int] = field(default_factory=list)
    folders: int = 0
    files: int = 0


class Namespace:
    def __init__(
        self,
        client: Listings,
        settings: Settings,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.catalog = Catalog(client, settings, clock=clock)
        self.settings = settings
        self.ttl = settings.metadata_ttl
        self.negative_ttl = settings.negative_ttl
        self.clock = clock
        self.changes: Changes | None = None  # told what a refresh finds changed
        self.sizes_asked: dict[int, float] = {}  # org folder inode -> last size asked
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
        keys: tuple[str, str] | None = None,
    ) -> Dir:
        d = Dir(
            next(self._inodes),
            name,
            parent,
            kind,
            org=org,
            asset=asset,
            category=category,
            keys=keys,
        )
        self.nodes[d.inode] = d
        return d

    def _new_file(self, name: str, parent: Dir, entry: Entry) -> File:
        ref = FileRef(parent.org, parent.asset, parent.category, entry.uri, *(parent.keys or ()))
        f = File(
            next(self._inodes), name, parent, ref, origin=entry.origin, mtime_ms=entry.mtime_ms
        )
        if entry.meta is not None:
            f.meta = entry.meta
            f.meta_at = self.clock() if entry.meta_at is None else entry.meta_at
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

        A view (by-name/, by-key/) is filled by its organisation's listing: it is as
        fresh as that, and listing it lists the organisation where that is due.
        """
        if d.kind in VIEW_KINDS:
            await self.children(self._org_of(d))
            return d.children if d.children is not None else {}
        if self.fresh(d):
            assert d.children is not None
            return d.children
        done = d.refreshing
        if done is None:
            done = d.refreshing = trio.Event()
            d.refresh_standing = current()  # the task below runs with the same
            if self.nursery is not None:
                self.nursery.start_soon(self._refresh, d, done)
            else:
                await self._refresh(d, done)
        needed(d.refresh_standing)  # a walk's read-ahead this caller waits for goes first
        await done.wait()
        if d.children is None:
            assert d.refresh_error is not None
            raise d.refresh_error.with_traceback(None)
        return d.children

    async def _refresh(self, d: Dir, done: trio.Event) -> None:
        try:
            kept = await self._kept(d) if d.children is None else None
            if kept is None:
                d.children = await self._list(d)
                d.loaded_at = self.clock()
            else:
                # From an earlier mount: fresh until it would have expired; past that,
                # served at once all the same, and asked again behind it.
                d.children, d.loaded_at = kept
                if not self.fresh(d):
                    self._revalidate(d)
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

    async def _kept(self, d: Dir) -> tuple[dict[str, Node], float] | None:
        """The folder as the metadata store kept it (its first listing only), placed,
        and when it was listed; None where nothing was kept."""
        if d.kind is DirKind.ORG:
            assets = await self.catalog.kept_assets(d.org)
            return None if assets is None else (self._place_assets(d, assets[0], {}), assets[1])
        if d.kind is DirKind.CATEGORY and d.keys is None:
            kept = await self.catalog.kept_entries(d.org, d.asset, d.category)
            return None if kept is None else (self._place(d, kept[0], {}), kept[1])
        return None

    def _revalidate(self, d: Dir) -> None:
        """Ask again for a stale listing kept from an earlier mount while it is served:
        in the background where there is a nursery, else at the next call."""
        if self.nursery is None:
            return  # loaded_at is past the TTL: the next call lists again
        d.loaded_at = self.clock()

        async def again() -> None:
            if d.refreshing is None:
                done = d.refreshing = trio.Event()
                with speculative() as token:  # nobody waits: the old listing is served
                    d.refresh_standing = token
                    await self._refresh(d, done)

        self.nursery.start_soon(again)

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
        if seen_missing is not None and self.clock() - seen_missing < self.negative_ttl:
            return None
        node = await self._lookup_unlisted(d, name)
        if node is None:
            if len(d.missing) > 1000:
                now = self.clock()
                d.missing = {k: t for k, t in d.missing.items() if now - t < self.negative_ttl}
            d.missing[name] = self.clock()
        else:
            d.hidden[name] = node
        return node

    async def _lookup_unlisted(self, d: Dir, name: str) -> Node | None:
        """An asset or file that no listing shows but that a user can name."""
        if d.kind is DirKind.ORG:
            # The views' names mean the views or nothing (where search is denied).
            if name in VIEW_NAMES or not await self.catalog.has_asset(d.org, name):
                return None
            return self._asset_dir(d, name)
        entry = await self.catalog.unlisted_file(
            d.org, d.asset, d.category, name, d.keys or ("", "")
        )
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
            asset_ids = await self.catalog.asset_ids(d.org)
            if self.nursery is not None:
                # Its assets' feature folders need their models next (catalog.py).
                self.nursery.start_soon(self.catalog.models_ahead, d.org, asset_ids)
            return self._place_assets(d, asset_ids, old)
        if d.kind is DirKind.ASSET:
            return {
                c: old.get(c)
                or self._new_dir(
                    c, d, DirKind.CATEGORY, org=d.org, asset=d.asset, category=c, keys=d.keys
                )
                for c in CATEGORIES
            }
        if d.keys is not None:
            return self._place(d, self.catalog.keyed_entries(d.org, d.keys, d.category), old)
        entries = await self.catalog.entries(d.org, d.asset, d.category)
        return self._place(d, entries, old)

    def _asset_dir(self, org_dir: Dir, asset_id: str, name: str | None = None) -> Dir:
        return self._new_dir(
            name or safe_name(asset_id), org_dir, DirKind.ASSET, org=org_dir.org, asset=asset_id
        )

    def _place_assets(self, d: Dir, asset_ids: list[str], old: dict[str, Node]) -> dict[str, Node]:
        """Folder names for asset ids, settled as file names are ('a/b' and 'a_b' both
        want 'a_b'). An id that is its own safe name keeps it, so a plain id never moves
        because an odd one appeared; a folder keeps its node while its name still means
        the same asset, and the kernel is told to forget a name that now means another.
        The views' names are taken first, whether the views show or not, so an asset
        named so is named the same on every mount."""
        wanted = [safe_name(a) for a in asset_ids]
        reserved = [(v, ("",)) for v in VIEW_NAMES]
        names = settle(
            [
                *reserved,
                *((w, ("0" if w == a else "1", a)) for w, a in zip(wanted, asset_ids, strict=True)),
            ],
            extensions=False,
        )[len(reserved) :]
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
        self._place_views(d, dict(zip(asset_ids, names, strict=True)), old, out)
        for name in old.keys() - out.keys():
            self._entry_changed(d, name)
        return out

    # -- views ---------------------------------------------------------------------------

    def _place_views(
        self, d: Dir, folders: dict[str, str], old: dict[str, Node], out: dict[str, Node]
    ) -> None:
        """by-name/ and by-key/ into the org folder `out`, from what its device search
        said (folders: asset id -> its folder's name); none where it may not search,
        but for by-key/ holding the devices configured files name by key alone.
        Folders and links keep their nodes while they mean the same; a link to another
        folder is a new node, and the kernel forgets the old one."""
        known = self.catalog.known.get(d.org)
        keyed = [Known("", "", p, k) for p, k in self.catalog.keyed_only(d.org)]
        if known is not None:
            names_view = self._view_dir(d, BY_NAME, DirKind.BY_NAME, old)
            names_view.children = self._place_links(names_view, by_name(known), folders)
            out[BY_NAME] = names_view
        if known is None and not keyed:
            self._drop_views(old, out)
            return
        keys_view = self._view_dir(d, BY_KEY, DirKind.BY_KEY, old)
        before = keys_view.children or {}
        products: dict[str, Node] = {}
        for product, devices in by_key([*(known or ()), *keyed]).items():
            folder = self._view_dir(keys_view, product, DirKind.PRODUCT, before)
            folder.children = self._place_keyed(folder, devices, folders)
            products[product] = folder
        for name in before.keys() - products.keys():
            self._drop_view(before[name])
            self._entry_changed(keys_view, name)
        keys_view.children = products
        out[BY_KEY] = keys_view
        self._drop_views(old, out)

    def _drop_views(self, old: dict[str, Node], out: dict[str, Node]) -> None:
        for name in VIEW_NAMES:
            if name in old and name not in out:
                self._drop_view(old[name])

    def _drop_view(self, node: Node) -> None:
        """A view that no longer shows is emptied, for a shell still inside it."""
        if isinstance(node, Dir) and node.kind in VIEW_KINDS:
            for child in (node.children or {}).values():
                self._drop_view(child)
            node.children = {}

    def _view_dir(self, parent: Dir, name: str, kind: DirKind, old: dict[str, Node]) -> Dir:
        node = old.get(name)
        if isinstance(node, Dir) and node.kind is kind:
            return node
        return self._new_dir(name, parent, kind, org=parent.org)

    def _place_links(
        self, d: Dir, wanted: dict[str, str], folders: dict[str, str]
    ) -> dict[str, Node]:
        """by-name/: name -> asset id, as links to the assets' folders."""
        old = d.children or {}
        out: dict[str, Node] = {}
        for name, asset in wanted.items():
            node = self._link(d, name, asset, folders, old)
            if node is not None:
                out[name] = node
        for name in old.keys() - out.keys():
            self._entry_changed(d, name)
        return out

    def _place_keyed(
        self, d: Dir, wanted: dict[str, Known], folders: dict[str, str]
    ) -> dict[str, Node]:
        """by-key/PRODUCT_KEY/: links to the assets' folders, and the own folders of
        devices known by their keys alone."""
        old = d.children or {}
        out: dict[str, Node] = {}
        for name, k in wanted.items():
            node: Node | None
            if k.asset_id:
                node = self._link(d, name, k.asset_id, folders, old)
            else:
                keys = (k.product_key, k.device_key)
                node = old.get(name)
                if not (isinstance(node, Dir) and node.kind is DirKind.ASSET and node.keys == keys):
                    if name in old:
                        self._entry_changed(d, name)
                    node = self._new_dir(name, d, DirKind.ASSET, org=d.org, keys=keys)
            if node is not None:
                out[name] = node
        for name in old.keys() - out.keys():
            self._entry_changed(d, name)
        return out

    def _link(
        self, d: Dir, name: str, asset: str, folders: dict[str, str], old: dict[str, Node]
    ) -> Link | None:
        """The link `name` in view folder d to the asset's folder (None: it has none),
        the node it was while its target is the same."""
        folder = folders.get(asset)
        if folder is None:
            return None
        target = "../" * (2 if d.kind is DirKind.PRODUCT else 1) + folder
        node = old.get(name)
        if isinstance(node, Link) and node.target == target:
            return node
        if name in old:
            self._entry_changed(d, name)
        link = Link(next(self._inodes), name, d, target=target, asset=asset)
        self.nodes[link.inode] = link
        return link

    def _org_of(self, d: Dir) -> Dir:
        node: Dir | None = d
        while node is not None and node.kind is not DirKind.ORG:
            node = node.parent
        assert node is not None, f"{d.path} is in no organisation"
        return node

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
        if self.changes is not None:
            self.changes.name_changed(d, name)

    # -- file metadata -------------------------------------------------------------------

    def _set_meta(self, f: File, meta: FileMeta) -> None:
        old = f.meta
        f.meta, f.meta_at = meta, self.clock()
        if f.mtime_ms is None:
            f.mtime_ms = meta.create_time_ms
        if old is not None and old.version != meta.version:
            log.info("%s changed on the server (size %s -> %s)", f.path, old.size, meta.size)
            if self.changes is not None:
                self.changes.version_changed(f, old)

    def meta_fresh(self, f: File) -> bool:
        return f.meta is not None and self.clock() - f.meta_at < self.ttl

    async def file_meta(self, f: File) -> FileMeta:
        """The file's metadata, fetched again when older than the TTL: with those of
        every other file of its folder that needs it, as one concurrent batch, since
        `ls -l` and `stat *` ask for them next. A caller whose file is in a batch
        under way waits for that batch instead of asking again."""
        if self.meta_fresh(f):
            assert f.meta is not None
            return f.meta
        d = f.parent
        if d is None or d.children is None or d.children.get(f.name) is not f:
            dropped = d.dropped.get(f.inode) if d is not None else None
            if dropped is not None and self.clock() - dropped[0] < self.negative_ttl:
                raise dropped[1].with_traceback(None)
            return await self._file_meta_alone(f)  # named by its id: not in a listing
        self._sizes_wanted(d)
        batch = d.sizing.get(f.inode) or await self._size_folder(d, f)
        needed(batch.standing.get(f.ref.uri))  # asked ahead, and now waited for
        await batch.wait_for(f.inode)
        err = batch.failed.get(f.inode)
        if err is None:
            if self.meta_fresh(f):
                assert f.meta is not None
                return f.meta
            return await self._file_meta_alone(f)  # the batch was cut short
        if f.meta is not None and not isinstance(err, (NotFound, BadRecord)):
            return f.meta  # stale but known; the read path checks sizes again
        raise err.with_traceback(None)

    def _sizes_wanted(self, d: Dir) -> None:
        """A listed file's size was asked for: note it on the organisation, so a walk
        over it (`ls -lR`, `du`) gets sizes fetched ahead with the listings."""
        org = d.parent.parent if d.parent is not None else None
        if org is not None and org.kind is DirKind.ORG:
            self.sizes_asked[org.inode] = self.clock()

    def sizes_wanted(self, org: Dir) -> bool:
        """Has a size in this organisation been asked for lately (see walkahead.py)?"""
        return self.clock() - self.sizes_asked.get(org.inode, float("-inf")) < SIZES_WANTED_FOR

    async def size_folder(self, d: Dir) -> None:
        """Size the folder's files that need it, as a batch others may join: a walk's
        read-ahead, before `ls -l` gets there."""
        if d.children is None:
            return
        files = [n for n in d.children.values() if isinstance(n, File) and not self.meta_fresh(n)]
        waiting = {id(b): b for n in files if (b := d.sizing.get(n.inode)) is not None}
        todo = [n for n in files if n.inode not in d.sizing]
        if todo:
            batch = await self._size_folder(d, todo[0])
            waiting[id(batch)] = batch
        for b in waiting.values():
            await b.done.wait()

    async def _size_folder(self, d: Dir, f: File) -> Sizing:
        """Start sizing f and the folder's other files that need it (not those a batch
        covers already, nor those that failed a moment ago). Runs in the mount's
        nursery where there is one, so a caller that gives up at its deadline leaves
        it to finish for the others."""
        assert d.children is not None
        now = self.clock()
        files = [f] + [
            n
            for n in d.children.values()
            if isinstance(n, File)
            and n is not f
            and n.inode not in d.sizing
            and not self.meta_fresh(n)
            and now - d.size_failed_at.get(n.inode, float("-inf")) >= RETRY_SIZE_AFTER
        ]
        batch = Sizing()
        for n in files:
            d.sizing[n.inode] = batch
        # Only f's size may have someone waiting for it: the rest is asked ahead of
        # need, behind any call someone waits for (priority.py).
        mine = f.ref.uri if urgent() else None
        batch.standing = {n.ref.uri: Ahead() for n in files if n.ref.uri != mine}
        if self.nursery is not None:
            self.nursery.start_soon(self._size, d, files, batch)
        else:
            await self._size(d, files, batch)
        return batch

    async def _size(self, d: Dir, files: list[File], batch: Sizing) -> None:
        by_uri: dict[str, list[File]] = {}
        for n in files:
            by_uri.setdefault(n.ref.uri, []).append(n)
        gone: list[File] = []

        def settle(uri: str, outcome: FileMeta | EnosfsError) -> None:
            """One answer, applied as it comes: its callers need not wait for the rest."""
            now = self.clock()
            for n in by_uri.get(uri, ()):
                if isinstance(outcome, FileMeta):
                    self._set_meta(n, outcome)
                    d.size_failed_at.pop(n.inode, None)
                else:
                    batch.failed[n.inode] = outcome
                    d.size_failed_at[n.inode] = now
                    if isinstance(outcome, (NotFound, BadRecord)):
                        gone.append(n)
                batch.settle(n.inode)

        try:
            await self.catalog.sizes(
                [n.ref for n in files], where=d.path, each=settle, standing=batch.standing
            )
            self._drop(d, gone, batch)
        except Exception:
            # A bug, not a server fault: it runs in the mount's nursery, which it must
            # not take down. Its callers get an error, said once here.
            log.exception("%s: sizing failed unexpectedly", d.path)
            for n in files:
                batch.failed.setdefault(n.inode, TransportError(f"{d.path}: sizing failed"))
        finally:
            for n in files:
                if d.sizing.get(n.inode) is batch:
                    del d.sizing[n.inode]
            batch.finish()

    def _drop(self, d: Dir, gone: list[File], batch: Sizing) -> None:
        """Files the server says are not there (or cannot be shown) leave the listing
        they were in, until a refresh shows them again; the kernel forgets them, and
        their names are missing for `negative_ttl` (as if looked up)."""
        names = {n.name for n in gone if d.children is not None and d.children.get(n.name) is n}
        if not names or d.children is None:
            return
        d.children = {k: v for k, v in d.children.items() if k not in names}
        now = self.clock()
        if len(d.dropped) > 1000:
            d.dropped = {i: e for i, e in d.dropped.items() if now - e[0] < self.negative_ttl}
        for n in gone:
            d.size_failed_at.pop(n.inode, None)
            d.dropped[n.inode] = (now, batch.failed[n.inode])
        for name in sorted(names):
            d.missing[name] = now
            self._entry_changed(d, name)

    async def _file_meta_alone(self, f: File) -> FileMeta:
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

    def listed(self, d: Dir) -> dict[str, Node] | None:
        """The folder's entries where children() has them fresh, without waiting: the
        kernel asks a walk's folders one after another, and most are listed already
        (read ahead, or kept from an earlier mount); None where it would have to wait."""
        if not self.fresh(d):
            return None
        return {} if d.children is None else d.children  # a view not filled: empty

    def fresh(self, d: Dir) -> bool:
        if d.kind in VIEW_KINDS:
            return self.fresh(self._org_of(d))
        return d.children is not None and (
            d.kind is DirKind.CONTROL or self.clock() - d.loaded_at < self.ttl
        )

    def expire(self, uri: str) -> None:
        """A download showed this file changed: check its metadata again at next use."""
        for f in self.all_files():
            if f.ref.uri == uri:
                f.meta_at = float("-inf")

    def known(self, path: str) -> Node | None:
        """The node `path` (from the root, '/'-separated) names among the nodes held
        now, or None. Asks no listing: a refresh must not begin by asking EnOS."""
        node: Node | None = self.root
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if not isinstance(node, Dir):
                return None
            node = (node.children or {}).get(part) or node.hidden.get(part)
            if node is None:
                return None
        return node

    def refresh(self, node: Node) -> Expired:
        """Make everything held of node and below it stale (`enosfs refresh`): folder
        listings, file records, names found missing, and the catalog's devices, thing
        models and firmware lists behind them. The next access asks EnOS again; until
        an answer comes, the last one is still served where asking fails, as after the
        TTL. A file's own folder is listed again too: its name may mean another file."""
        out = Expired()
        if isinstance(node, File) and node.parent is not None:
            node.parent.loaded_at = float("-inf")
        stack: list[Node] = [node]
        seen: set[int] = set()
        while stack:
            n = stack.pop()
            if n.inode in seen:
                continue  # a file both listed and named by its id
            seen.add(n.inode)
            if isinstance(n, File):
                n.meta_at = float("-inf")
                out.files += 1
                out.inodes.append(n.inode)
                if n.parent is not None:
                    out.names.append((n.parent.inode, n.name))
            elif isinstance(n, Dir) and n.kind in VIEW_KINDS:
                # Made by the org's listing: that is what is asked again.
                self._org_of(n).loaded_at = float("-inf")
            elif isinstance(n, Dir) and n.kind is not DirKind.CONTROL:
                out.folders += 1
                n.loaded_at = float("-inf")
                out.names.extend((n.inode, name) for name in n.missing)
                n.missing.clear()
                n.dropped.clear()  # files sizing found gone are asked about again
                n.size_failed_at.clear()
                stack.extend((n.children or {}).values())
                stack.extend(n.hidden.values())
                if n.kind is DirKind.ORG:
                    self.catalog.forget(n.org)
                elif n.kind is DirKind.ASSET:
                    self.catalog.forget(n.org, n.asset)
        return out

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
