"""Listings and file records kept on disk, so a remount starts from what it knew.

A big organisation costs thousands of API calls to walk (device search pages, one
queryLatest per device, one getFileInfo per file); a remount that forgets all of it
makes the user wait minutes for answers nothing has changed. This store keeps, in the
cache folder, what the catalog learnt: per org its asset ids (and what device search
said people name them by, for the by-name and by-key views), per (org, asset,
category) its listing, per file (place plus fileUri) its FileMeta, each with the
wall-clock time it was fetched, so it expires after a remount exactly when it would
have without one.

It is a cache, never a source of truth, and is treated as one:

- sqlite in WAL mode with synchronous=NORMAL: a crash or a power cut loses at most the
  last batches, never the file, and a torn WAL frame fails its checksum and is ignored;
- at open, the schema version and a quick_check must hold; a file that is not a
  database, that fails the check or has another layout is moved aside and a new one
  started, with one warning: what it held is never trusted, and the mount never fails
  for it;
- an sqlite error while in use is said once and the store is off for the rest of the
  session: the mount goes on from the network, as it would without a cache folder.

sqlite calls block, so none runs on the trio thread that serves the kernel: writes are
queued (the latest record for a key replaces an older one still waiting) and written
by one task in batches, one transaction each, in a worker thread; reads happen once per
org, in bulk, when the org is first used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from enosfs.api import FileMeta
from enosfs.catalog import Entry
from enosfs.errors import EnosfsError
from enosfs.views import Known

log = logging.getLogger(__name__)

FILE_NAME = "metadata.sqlite3"
DAMAGED_SUFFIX = ".damaged"
SCHEMA_VERSION = 2  # 2: assets.known
# Records waiting for the writer beyond this are dropped (and asked again next mount):
# a disk that cannot keep up must not grow the mount's memory without bound.
MAX_PENDING = 100_000
# How long the writer lets records gather before a batch: one transaction per
# getFileInfo answer would cost a disk sync each.
BATCH_DELAY = 0.2
# How long an unmount waits for the records still queued.
DRAIN_TIME = 5.0
_BUSY_TIMEOUT = 5.0

_SCHEMA = (
    # known: the views' device names and keys (views.Known), NULL where search was denied.
    "CREATE TABLE assets (org TEXT PRIMARY KEY, ids TEXT NOT NULL, known TEXT,"
    " fetched REAL NOT NULL)",
    "CREATE TABLE listings (org TEXT NOT NULL, asset TEXT NOT NULL, category TEXT NOT NULL,"
    " entries TEXT NOT NULL, fetched REAL NOT NULL,"
    " PRIMARY KEY (org, asset, category)) WITHOUT ROWID",
    # One column per FileMeta field, in its order: 20,000 of these load at a mount, and
    # a JSON text each would cost more to decode than the rest of the load.
    "CREATE TABLE metas (org TEXT NOT NULL, asset TEXT NOT NULL, category TEXT NOT NULL,"
    " uri TEXT NOT NULL, size INTEGER, md5 TEXT, original_name TEXT, create_time_ms INTEGER,"
    " sign_method TEXT, sign TEXT, etag TEXT, fetched REAL NOT NULL,"
    " PRIMARY KEY (org, asset, category, uri)) WITHOUT ROWID",
)

T = TypeVar("T")
Place = tuple[str, str, str]  # org, asset, category


@dataclass(frozen=True)
class Stored(Generic[T]):
    """A value and the wall-clock time (time.time()) it was fetched from EnOS."""

    value: T
    fetched: float

    def age(self, now: float | None = None) -> float:
        """Seconds since it was fetched. A fetch time ahead of now (the clock was set
        back since) counts as infinitely old: nothing says how old the record is."""
        age = (time.time() if now is None else now) - self.fetched
        return age if age >= 0 else float("inf")


@dataclass
class OrgRecord:
    """All the store holds of one org, as loaded at its first use."""

    assets: Stored[list[str]] | None = None
    known: list[Known] | None = None  # fetched with assets
    listings: dict[tuple[str, str], Stored[list[Entry]]] = field(default_factory=dict)
    metas: dict[tuple[str, str, str], Stored[FileMeta]] = field(default_factory=dict)


class Damaged(Exception):
    """The file at the store's path is not a store this version can trust."""


# -- records as text -----------------------------------------------------------------------


# The metas table's FileMeta columns, in the dataclass's order (uri first, then these).
_META_COLUMNS = ", ".join(f.name for f in dataclasses.fields(FileMeta)[1:])


def _meta_from(data: Any) -> FileMeta:
    if not isinstance(data, dict):
        raise ValueError("not a record")
    # FileMeta checks its size itself (BadRecord); unknown or missing fields: TypeError.
    return FileMeta(**data)


def _entries_json(entries: Iterable[Entry]) -> str:
    return json.dumps(
        [
            [
                e.wanted,
                list(e.key),
                e.uri,
                None if e.meta is None else dataclasses.asdict(e.meta),
                e.origin,
                e.mtime_ms,
            ]
            for e in entries
        ],
        separators=(",", ":"),
    )


def _entries_from(text: str) -> list[Entry]:
    entries = []
    for wanted, key, uri, meta, origin, mtime in json.loads(text):
        if not (
            isinstance(wanted, str)
            and isinstance(uri, str)
            and isinstance(key, list)
            and all(isinstance(k, str) for k in key)
            and isinstance(origin, dict)
            and (mtime is None or isinstance(mtime, int))
        ):
            raise ValueError("not an entry")
        entries.append(
            Entry(
                wanted, tuple(key), uri, None if meta is None else _meta_from(meta), origin, mtime
            )
        )
    return entries


def _known_json(known: list[Known] | None) -> str | None:
    if known is None:
        return None
    rows = [[k.asset_id, k.name, k.product_key, k.device_key] for k in known]
    return json.dumps(rows, separators=(",", ":"))


def _known_from(text: str) -> list[Known]:
    rows = json.loads(text)
    if not isinstance(rows, list) or not all(
        isinstance(r, list) and len(r) == 4 and all(isinstance(v, str) for v in r) for r in rows
    ):
        raise ValueError("not a list of devices")
    return [Known(*r) for r in rows]


_UNREADABLE = (ValueError, TypeError, EnosfsError)  # json, shape, and FileMeta's own check


# -- the file --------------------------------------------------------------------------------


class MetaFile:
    """One sqlite connection to the store, safe to call from any one thread at a time
    (a lock makes sure). Blocking: call it from a worker thread."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, folder: Path) -> MetaFile | None:
        """The store in `folder`: checked, or started afresh if it cannot be trusted.
        None only if not even a new one can be made there (said in the log)."""
        path = folder / FILE_NAME
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("metadata store %s cannot be made (%s); metadata is not kept", path, exc)
            return None
        try:
            return cls(path, _connect(path))
        except (Damaged, sqlite3.Error, OSError) as exc:
            if _busy(exc):
                log.warning("metadata store %s is in use (%s); metadata is not kept", path, exc)
                return None
            log.warning("metadata store %s was damaged (%s); starting afresh", path, exc)
        try:
            _move_aside(path)
            return cls(path, _connect(path))
        except (Damaged, sqlite3.Error, OSError) as exc:
            log.warning("metadata store %s cannot be made (%s); metadata is not kept", path, exc)
            return None

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def load(self, org: str) -> tuple[OrgRecord, int]:
        """All of an org's records, and how many were unreadable (left out, not served)."""
        record = OrgRecord()
        bad = 0
        with self._lock:
            c = self.conn
            row = c.execute(
                "SELECT ids, known, fetched FROM assets WHERE org = ?", (org,)
            ).fetchone()
            if row is not None:
                try:
                    ids = json.loads(row[0])
                    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                        raise ValueError("not a list of ids")
                    known = None if row[1] is None else _known_from(row[1])
                    record.assets, record.known = Stored(ids, float(row[2])), known
                except _UNREADABLE:
                    bad += 1
            for asset, category, text, fetched in c.execute(
                "SELECT asset, category, entries, fetched FROM listings WHERE org = ?", (org,)
            ):
                try:
                    record.listings[(asset, category)] = Stored(_entries_from(text), fetched)
                except _UNREADABLE:
                    bad += 1
            for asset, category, uri, *fields, fetched in c.execute(
                f"SELECT asset, category, uri, {_META_COLUMNS}, fetched FROM metas WHERE org = ?",
                (org,),
            ):
                try:
                    if not isinstance(fields[0], int | None):
                        raise ValueError("not a size")
                    meta = FileMeta(uri, *fields)
                    record.metas[(asset, category, uri)] = Stored(meta, fetched)
                except _UNREADABLE:
                    bad += 1
        return record, bad

    def write(self, batch: Iterable[tuple[Any, ...]]) -> None:
        """Write a batch of queued records (see MetaStore) in one transaction."""
        with self._lock:
            c = self.conn
            c.execute("BEGIN IMMEDIATE")
            try:
                for record in batch:
                    _WRITERS[record[0]](c, *record[1:])
                c.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    c.execute("ROLLBACK")
                raise

    def counts(self) -> dict[str, int]:
        """Rows per table: for tests and the stats page."""
        with self._lock:
            return {
                t: self.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("assets", "listings", "metas")
            }


def _write_assets(
    c: sqlite3.Connection, org: str, ids: list[str], known: list[Known] | None, fetched: float
) -> None:
    c.execute(
        "INSERT OR REPLACE INTO assets VALUES (?, ?, ?, ?)",
        (org, json.dumps(ids, separators=(",", ":")), _known_json(known), fetched),
    )
    # What an org no longer lists goes with it, so the store stays the size of the org.
    listed = set(ids)
    held = {
        a
        for (a,) in c.execute(
            "SELECT asset FROM listings WHERE org = ? UNION SELECT asset FROM metas WHERE org = ?",
            (org, org),
        )
    }
    gone = [(org, a) for a in held - listed]
    c.executemany("DELETE FROM listings WHERE org = ? AND asset = ?", gone)
    c.executemany("DELETE FROM metas WHERE org = ? AND asset = ?", gone)


def _write_listing(
    c: sqlite3.Connection, place: Place, entries: list[Entry], fetched: float
) -> None:
    c.execute(
        "INSERT OR REPLACE INTO listings VALUES (?, ?, ?, ?, ?)",
        (*place, _entries_json(entries), fetched),
    )
    # Records of files the folder no longer shows go too.
    listed = {e.uri for e in entries}
    held = {
        u
        for (u,) in c.execute(
            "SELECT uri FROM metas WHERE org = ? AND asset = ? AND category = ?", place
        )
    }
    c.executemany(
        "DELETE FROM metas WHERE org = ? AND asset = ? AND category = ? AND uri = ?",
        [(*place, u) for u in held - listed],
    )


def _write_meta(c: sqlite3.Connection, place: Place, meta: FileMeta, fetched: float) -> None:
    c.execute(
        "INSERT OR REPLACE INTO metas VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*place, *dataclasses.astuple(meta), fetched),
    )


def _write_forget(c: sqlite3.Connection, scope: tuple[str, ...]) -> None:
    """Drop what is held of a subtree (see MetaStore.forget)."""
    columns = ("org", "asset", "category", "uri")
    # A file's folder goes too: it is listed again, as the mount lists it again.
    folder = scope[:3]

    def where(values: tuple[str, ...]) -> str:
        return " AND ".join(f"{name} = ?" for name in columns[: len(values)]) or "1"

    if len(scope) <= 1:
        c.execute(f"DELETE FROM assets WHERE {where(scope)}", scope)
    c.execute(f"DELETE FROM listings WHERE {where(folder)}", folder)
    c.execute(f"DELETE FROM metas WHERE {where(scope)}", scope)


_WRITERS: dict[str, Any] = {
    "assets": _write_assets,
    "listing": _write_listing,
    "meta": _write_meta,
    "forget": _write_forget,
}


def _connect(path: Path) -> sqlite3.Connection:
    """Open and check the store at path, making it if there is none. Raises Damaged or
    sqlite3.Error where the file cannot be trusted."""
    fresh = not path.exists() or path.stat().st_size == 0
    conn = sqlite3.connect(
        path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
    )
    try:
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise Damaged("cannot use a write-ahead log")
        conn.execute("PRAGMA synchronous = NORMAL")
        if fresh:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        else:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise Damaged(f"layout {version}, not {SCHEMA_VERSION}")
            problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise Damaged("; ".join(map(str, problems[:3])))
    except BaseException:
        conn.close()
        raise
    return conn


def _move_aside(path: Path) -> None:
    """Keep the last damaged file for whoever wants to see why (one, replaced each time);
    its log and shared-memory files belong to it and go."""
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
    for suffix in ("-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.with_name(path.name + suffix))


def _busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


# -- the trio face ---------------------------------------------------------------------------


class MetaStore:
    """What the catalog talks to: loads in a worker thread, saves queued for a writer
    task (run()) that batches them. Any error in either turns the store off for the
    session, said once; every method is then a cheap no-op."""

    def __init__(self, file: MetaFile) -> None:
        self.file: MetaFile | None = file
        self.counts: Counter[str] = Counter()
        self._pending: dict[tuple[str, ...], tuple[Any, ...]] = {}
        self._wake = trio.Event()
        self._io = trio.Lock()  # one worker thread at a time on the connection

    @classmethod
    async def open(cls, folder: Path) -> MetaStore | None:
        file = await trio.to_thread.run_sync(MetaFile.open, folder)
        return None if file is None else cls(file)

    @property
    def enabled(self) -> bool:
        return self.file is not None

    def stats(self) -> dict[str, Any]:
        """Its part of /.enosfs/stats: records loaded at start, written, and whether the
        store is still in use (an error turns it off for the session)."""
        return {"metadata_store": {"enabled": self.enabled, **dict(sorted(self.counts.items()))}}

    # -- reading ----------------------------------------------------------------------------

    async def load(self, org: str) -> OrgRecord:
        """What the store holds of org (empty if it is off or fails now)."""
        file = self.file
        if file is None:
            return OrgRecord()
        try:
            async with self._io:
                record, bad = await trio.to_thread.run_sync(file.load, org)
        except Exception as exc:  # whatever it is, a cache must not take the mount down
            self._fail("reading", exc)
            return OrgRecord()
        self.counts["loaded"] += (
            (record.assets is not None) + len(record.listings) + len(record.metas)
        )
        if bad:
            self.counts["unreadable"] += bad
            log.warning("metadata store: %d records of %s unreadable; asked again", bad, org)
        return record

    # -- writing ----------------------------------------------------------------------------

    def save_assets(
        self,
        org: str,
        ids: list[str],
        fetched: float | None = None,
        known: list[Known] | None = None,
    ) -> None:
        """The org's asset ids, as listed, and what search said of its devices (None:
        search was not allowed); what it no longer lists is dropped."""
        self._queue(
            ("assets", org),
            ("assets", org, list(ids), None if known is None else list(known), _when(fetched)),
        )

    def save_listing(
        self, place: Place, entries: list[Entry], fetched: float | None = None
    ) -> None:
        """A folder's entries, as listed (copied now: the caller may change them later)."""
        copied = [dataclasses.replace(e, key=tuple(e.key), origin=dict(e.origin)) for e in entries]
        self._queue(("listing", *place), ("listing", place, copied, _when(fetched)))

    def save_meta(self, place: Place, meta: FileMeta, fetched: float | None = None) -> None:
        """A file's record, as getFileInfo (or a probe) gave it."""
        self._queue(("meta", *place, meta.uri), ("meta", place, meta, _when(fetched)))

    def forget(self, scope: tuple[str, ...]) -> None:
        """Drop what is held of a subtree (`enosfs refresh`), so that a remount asks
        EnOS rather than serve what the refresh was meant to replace: scope is a prefix
        of (org, asset, category, fileUri), () for everything; a file's folder listing
        goes with it. Queued behind the records saved before it, so none of those
        comes back; flush() to have it on disk."""
        self._queue(("forget", *scope), ("forget", tuple(scope)))

    def _queue(self, key: tuple[str, ...], record: tuple[Any, ...]) -> None:
        if self.file is None:
            return
        # A forget is never dropped: the records it removes would be served again.
        if key not in self._pending and len(self._pending) >= MAX_PENDING and key[0] != "forget":
            self.counts["dropped"] += 1
            return
        # Out and in again: the record takes its place in time order, after (say) an
        # org listing that would otherwise prune it.
        self._pending.pop(key, None)
        self._pending[key] = record
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer: runs in the mount's nursery until cancelled."""
        task_status.started()
        while self.file is not None:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(BATCH_DELAY)
            await self._write_pending()

    async def _write_pending(self) -> None:
        async with self._io:
            batch, self._pending = list(self._pending.values()), {}
            file = self.file
            if batch and file is not None:
                try:
                    await trio.to_thread.run_sync(file.write, batch)
                except Exception as exc:  # as in load()
                    self._fail("writing", exc)
                else:
                    self.counts["written"] += len(batch)
                    self.counts["batches"] += 1

    async def flush(self, timeout: float = DRAIN_TIME) -> int:
        """Write what is queued now (at unmount, or for a test), waiting at most timeout
        seconds; return how many records were left unwritten. Shielded and never raises
        Cancelled: safe in a finally block."""
        with trio.CancelScope(deadline=trio.current_time() + timeout, shield=True):
            while self._pending and self.file is not None:
                await self._write_pending()
        return len(self._pending) if self.file is not None else 0

    async def close(self, timeout: float = DRAIN_TIME) -> None:
        """Flush, then let the file go (its WAL is folded back in by sqlite)."""
        left = await self.flush(timeout)
        if left:
            log.info("metadata store: %d records not written at unmount", left)
        file, self.file = self.file, None
        self._wake.set()  # let run() see the store is gone
        if file is not None:
            with trio.CancelScope(shield=True):
                async with self._io:
                    await trio.to_thread.run_sync(file.close)

    def _fail(self, doing: str, exc: Exception) -> None:
        """Off for the session: a store that failed once is not trusted again."""
        file, self.file = self.file, None
        self._pending.clear()
        self._wake.set()
        self.counts["failed"] += 1
        log.warning(
            "metadata store: %s failed (%s); metadata is not kept for the rest of this mount",
            doing,
            exc,
        )
        if file is not None:
            file.close()


def _when(fetched: float | None) -> float:
    return time.time() if fetched is None else fetched
