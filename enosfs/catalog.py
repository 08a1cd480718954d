"""What EnOS says an organisation holds, as entries the tree can name and place.

There is no "list files" API: an asset's files are found by device search, its thing
model's FILE-type features and their latest values (feature/), or its product's
firmware (ota/), and merged with the files the configuration names. This module does
that walk and nothing else: it holds no inode and no node, so the tree (namespace.py)
decides names and identity, and this decides what exists.

A listing does not size its files: `find` and `ls` need names only, and getFileInfo per
file would be most of a walk's calls. Sizes are asked for (`sizes`) when the tree is
asked for attributes, a folder at a time.

Device, thing-model and firmware answers are kept for `metadata_ttl` seconds: a folder
refresh of a thousand assets sharing a few models asks for each model once. An API the
app is not permitted to use is said once in the log and treated as answering nothing,
so the configured part of the tree still shows.

With a cache folder, every listing and file record fetched is also written to the
metadata store (metastore.py), and an org's first listings after a mount are offered
from it (`kept_assets`, `kept_entries`) with the time they were fetched, so the tree
serves them at once and asks again when they would have expired anyway.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import trio

from enosfs.api import BadRecord, Device, FileFeatures, FileMeta, FileRef, Firmware
from enosfs.config import Settings
from enosfs.errors import Denied, EnosfsError, NotFound
from enosfs.expiring import Expiring
from enosfs.naming import feature_file_name, firmware_file_name, safe_name, uri_id
from enosfs.source import Listings

if TYPE_CHECKING:
    from enosfs.metastore import MetaStore, OrgRecord

log = logging.getLogger(__name__)

# getFileInfo calls of one mount in flight at once, for sizing folders: as many as the
# API bound allows by default (network.max_api_concurrency), which adapts below it.
META_CONCURRENCY = 32
_ID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)?")
_ASSET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FILE_SCHEMES = ("enos-connect://",)


@dataclass
class Entry:
    """A file found by a listing, before names are settled."""

    wanted: str
    key: tuple[str, ...]
    uri: str
    meta: FileMeta | None
    origin: dict[str, str]
    mtime_ms: int | None
    # When meta was fetched, in the catalog's clock, if not just now (a record kept
    # from an earlier mount): the tree trusts it only until it would have expired.
    meta_at: float | None = None


class Catalog:
    def __init__(
        self,
        client: Listings,
        settings: Settings,
        *,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.settings = settings
        self.clock = clock
        self.wall = wall  # the store's clock: it must mean the same after a remount
        # Where listings and records are kept across mounts (set by the mount).
        self.store: MetaStore | None = None
        # org -> what the store had and is not used yet (None: nothing to offer).
        self._kept: dict[str, OrgRecord | None] = {}
        self._loading: dict[str, trio.Event] = {}
        ttl = settings.metadata_ttl
        self.devices: Expiring[tuple[str, str], Device] = Expiring(ttl, clock)
        self.models: Expiring[tuple[str, str], FileFeatures] = Expiring(ttl, clock)
        self.firmwares: Expiring[tuple[str, str], list[Firmware]] = Expiring(ttl, clock)
        self._denied_said: set[str] = set()
        self._bad_said: set[str] = set()  # fileUris whose record was said to be unusable
        self._meta_limit = trio.Semaphore(META_CONCURRENCY)

    # -- an organisation -----------------------------------------------------------------

    async def asset_ids(self, org: str) -> list[str]:
        """The org's assets: found by device search (where enabled) and configured."""
        settings = next(o for o in self.settings.orgs if o.org_id == org)
        ids: list[str] = []
        if settings.discover:
            try:
                devices = await self.client.search_devices(org)
            except Denied as exc:
                self._say_denied(f"device search in {org}", exc)
                devices = []
            now = self.devices.clock()
            for dev in devices:
                self.devices.put((org, dev.asset_id), dev, at=now)
                ids.append(dev.asset_id)
        ids.extend(settings.assets)
        ids.extend(f.asset for f in self.settings.files if f.org == org)
        found = sorted(set(ids))
        if self.store is not None:
            self.store.save_assets(org, found, self.wall())
        return found

    async def has_asset(self, org: str, name: str) -> bool:
        """Whether `name` is the id of an asset no listing shows (a user may name it)."""
        if not self.could_be_asset(name):
            return False
        try:
            device = await self.client.get_device(org, name)
        except (NotFound, Denied):
            return False
        self.devices.put((org, name), device)
        return True

    # -- an asset's category -------------------------------------------------------------

    async def entries(self, org: str, asset: str, category: str) -> list[Entry]:
        """The category's files, sized only where the listing itself said (firmware)."""
        if category == "feature":
            entries = await self._feature_entries(org, asset)
        else:
            entries = await self._ota_entries(org, asset)
        entries.extend(self._configured(org, asset, category))
        if self.store is not None:
            self.store.save_listing((org, asset, category), entries, self.wall())
        return entries

    @staticmethod
    def could_be_asset(name: str) -> bool:
        """Whether `name` can be an asset id at all: a name that cannot (`.git`,
        `__pycache__`, `a b`) is not worth a call to find out it is not there."""
        return _ASSET_NAME.fullmatch(name) is not None

    @staticmethod
    def could_be_file_id(name: str) -> bool:
        """Whether `name` can be a fileUri's id, as could_be_asset is for assets."""
        return _ID_NAME.fullmatch(name) is not None

    async def sizes(
        self, refs: list[FileRef], where: str = ""
    ) -> dict[str, FileMeta | EnosfsError]:
        """fileUri -> its record, or why there is none, for a folder's files at once:
        `ls -l` asks for every entry right after the first, so the first pays one round
        trip for all. Concurrent within META_CONCURRENCY (shared by every folder); each
        fileUri is asked once however many names show it. `where` names the folder in
        the log."""
        out: dict[str, FileMeta | EnosfsError] = {}

        async def fill(ref: FileRef) -> None:
            try:
                async with self._meta_limit:
                    out[ref.uri] = await self.file_meta(ref)
            except NotFound as exc:
                log.debug("%s: %s is referenced but does not exist", where, ref.uri)
                out[ref.uri] = exc
            except BadRecord as exc:
                # Not shown: nothing true could be said of it in `ls -l`.
                if ref.uri not in self._bad_said:
                    self._bad_said.add(ref.uri)
                    log.warning("%s: not showing %s: %s", where, uri_id(ref.uri), exc)
                out[ref.uri] = exc
            except EnosfsError as exc:
                # Still listed; the next getattr of it asks again.
                log.warning("%s: no metadata for %s: %s", where, uri_id(ref.uri), exc)
                out[ref.uri] = exc

        unique = {ref.uri: ref for ref in refs}
        async with trio.open_nursery() as nursery:
            for ref in unique.values():
                nursery.start_soon(fill, ref)
        return out

    async def unlisted_file(self, org: str, asset: str, category: str, name: str) -> Entry | None:
        """The file whose fileUri's id is `name`, though no listing shows it."""
        if not self.could_be_file_id(name):
            return None
        uri = "enos-connect://" + name
        try:
            meta = await self.file_meta(FileRef(org, asset, category, uri))
        except NotFound:
            return None
        return Entry(name, (), uri, meta, {"uri": uri}, meta.create_time_ms)

    async def file_meta(self, ref: FileRef) -> FileMeta:
        """One file's record, asked for now (the tree decides when it is due)."""
        meta = await self.client.file_meta(ref)
        if self.store is not None:
            self.store.save_meta((ref.org, ref.asset, ref.category), meta, self.wall())
        return meta

    # -- what an earlier mount kept ------------------------------------------------------

    async def kept_assets(self, org: str) -> tuple[list[str], float] | None:
        """The org's asset ids as the store kept them, and when (in `clock`) they were
        listed; once per mount (the first listing), None where there are none."""
        kept = await self._kept_of(org)
        if kept is None or kept.assets is None:
            return None
        stored, kept.assets = kept.assets, None
        return stored.value, self._then(stored.age(self.wall()))

    async def kept_entries(
        self, org: str, asset: str, category: str
    ) -> tuple[list[Entry], float] | None:
        """A folder's entries as the store kept them, and when they were listed, with
        the file records kept since (each with its own time, in Entry.meta_at); once
        per mount, as kept_assets."""
        kept = await self._kept_of(org)
        stored = None if kept is None else kept.listings.pop((asset, category), None)
        if kept is None or stored is None:
            return None
        now = self.wall()
        listed_at = self._then(stored.age(now))
        for e in stored.value:
            record = kept.metas.pop((asset, category, e.uri), None)
            if record is not None:
                e.meta, e.meta_at = record.value, self._then(record.age(now))
            elif e.meta is not None:
                e.meta_at = listed_at  # came with the listing (firmware)
            if e.meta is not None and e.mtime_ms is None:
                e.mtime_ms = e.meta.create_time_ms
        return stored.value, listed_at

    async def _kept_of(self, org: str) -> OrgRecord | None:
        """What the store holds of org, loaded at its first use (once, however many
        folders ask at the same time)."""
        if self.store is None:
            return None
        loading = self._loading.get(org)
        if loading is None:
            loading = self._loading[org] = trio.Event()
            try:
                self._kept.setdefault(org, await self.store.load(org))
            finally:
                loading.set()
        await loading.wait()
        return self._kept.get(org)

    def _then(self, age: float) -> float:
        """The time in `clock` that was `age` seconds ago (-inf for "unknown")."""
        return self.clock() - age

    def forget(self, org: str, asset: str | None = None) -> None:
        """Make what is kept of an organisation, or of one asset, stale (`enosfs
        refresh`): its device, and the thing model and firmware its listing came from,
        are asked again at next use. Stale, not dropped, so an API that now answers
        Denied still has the last answer (see Expiring). What an earlier mount kept of
        it is not offered any more."""
        kept = self._kept.get(org)
        if asset is None or kept is None:
            self._kept[org] = None  # (an org not loaded yet loses all it kept: rare)
        else:
            kept.listings = {k: v for k, v in kept.listings.items() if k[0] != asset}
        if asset is None:
            self.devices.expire_where(lambda key: key[0] == org)
            self.models.expire_where(lambda key: key[0] == org)
            self.firmwares.expire_where(lambda key: key[0] == org)
            return
        self.devices.expire_where(lambda key: key == (org, asset))
        device = self.devices.last((org, asset))
        if device is not None:
            self.models.expire_where(lambda key: key == (org, device.model_id))
            self.firmwares.expire_where(lambda key: key == (org, device.product_key))

    # -- the walk ------------------------------------------------------------------------

    def _say_denied(self, what: str, exc: EnosfsError) -> None:
        if what not in self._denied_said:
            self._denied_said.add(what)
            log.warning(
                "%s is not permitted for this app (%s); showing only what the configuration names",
                what,
                exc,
            )

    async def _device(self, org: str, asset: str) -> Device | None:
        key = (org, asset)
        cached = self.devices.fresh(key)
        if cached is not None:
            return cached
        try:
            dev = await self.client.get_device(org, asset)
        except NotFound:
            return None
        except Denied as exc:
            self._say_denied(f"device details in {org}", exc)
            return self.devices.last(key)
        self.devices.put(key, dev)
        return dev

    async def _features(self, org: str, model_id: str) -> FileFeatures:
        key = (org, model_id)
        cached = self.models.fresh(key)
        if cached is not None:
            return cached
        try:
            features = await self.client.get_file_features(org, model_id)
        except (Denied, NotFound) as exc:
            self._say_denied(f"thing model {model_id}", exc)
            features = FileFeatures()
        self.models.put(key, features)
        return features

    async def _firmwares(self, org: str, product_key: str) -> list[Firmware]:
        key = (org, product_key)
        cached = self.firmwares.fresh(key)
        if cached is not None:
            return cached
        try:
            found = await self.client.search_firmwares(org, product_key)
        except Denied as exc:
            self._say_denied(f"firmware search in {org}", exc)
            found = []
        self.firmwares.put(key, found)
        return found

    def _configured(self, org: str, asset: str, category: str) -> list[Entry]:
        return [
            Entry(
                # The configuration checks names, but a URI's tail may still be '..'.
                safe_name(f.name or uri_id(f.uri), fallback="file"),
                ("2", f.uri),
                f.uri,
                None,
                {"uri": f.uri, "source": "configuration"},
                None,
            )
            for f in self.settings.files
            if (f.org, f.asset, f.category) == (org, asset, category)
        ]

    async def _feature_entries(self, org: str, asset: str) -> list[Entry]:
        entries: list[Entry] = []
        device = await self._device(org, asset)
        if device is None or not device.model_id:
            return entries
        features = await self._features(org, device.model_id)
        for ident in features.attributes:
            uri = device.attributes.get(ident)
            if _is_file_uri(uri):
                entries.append(
                    Entry(
                        feature_file_name(ident, uri),
                        ("0", ident),
                        uri,
                        None,
                        {"uri": uri, "feature": ident, "feature_type": "attribute"},
                        None,
                    )
                )
        if features.measurepoints:
            try:
                latest = await self.client.query_latest(org, asset, list(features.measurepoints))
            except Denied as exc:
                self._say_denied(f"latest measurement points in {org}", exc)
                latest = {}
            for ident in features.measurepoints:
                uri = latest.get(ident)
                if _is_file_uri(uri):
                    entries.append(
                        Entry(
                            feature_file_name(ident, uri),
                            ("1", ident),
                            uri,
                            None,
                            {"uri": uri, "feature": ident, "feature_type": "measurepoint"},
                            None,
                        )
                    )
        return entries

    async def _ota_entries(self, org: str, asset: str) -> list[Entry]:
        entries: list[Entry] = []
        device = await self._device(org, asset)
        if device is None or not device.product_key:
            return entries
        for fw in await self._firmwares(org, device.product_key):
            md5 = fw.sign if fw.sign_method == "md5" else None
            meta = FileMeta(
                uri=fw.url,
                size=fw.size,
                md5=md5,
                sign_method=fw.sign_method,
                sign=fw.sign,
                create_time_ms=fw.create_time_ms,
            )
            origin = {
                "uri": fw.url,
                "firmware_id": fw.firmware_id,
                "firmware": fw.name,
                "version": fw.version,
            }
            entries.append(
                Entry(
                    firmware_file_name(fw.name, fw.version, fw.url),
                    ("0", fw.name, fw.version, fw.firmware_id),
                    fw.url,
                    meta if fw.size is not None else None,
                    origin,
                    fw.create_time_ms,
                )
            )
        return entries


def _is_file_uri(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and any(
        value.startswith(scheme) and len(value) > len(scheme) for scheme in _FILE_SCHEMES
    )
