"""What EnOS says an organisation holds, as entries the tree can name and place.

There is no "list files" API: an asset's files are found by device search, its thing
model's FILE-type features and their latest values (feature/), or its product's
firmware (ota/), then sized by getFileInfo, and merged with the files the configuration
names. This module does that walk and nothing else: it holds no inode and no node, so
the tree (namespace.py) decides names and identity, and this decides what exists.

Device, thing-model and firmware answers are kept for `metadata_ttl` seconds: a folder
refresh of a thousand assets sharing a few models asks for each model once. An API the
app is not permitted to use is said once in the log and treated as answering nothing,
so the configured part of the tree still shows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import trio

from enosfs.api import BadRecord, Device, EnosClient, FileFeatures, FileMeta, FileRef, Firmware
from enosfs.config import Settings
from enosfs.errors import Denied, EnosfsError, NotFound
from enosfs.expiring import Expiring
from enosfs.naming import feature_file_name, firmware_file_name, safe_name, uri_id

log = logging.getLogger(__name__)

META_CONCURRENCY = 16
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


KnownMeta = Callable[[str], FileMeta | None]


def _none(uri: str) -> FileMeta | None:
    return None


class Catalog:
    def __init__(
        self,
        client: EnosClient,
        settings: Settings,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.client = client
        self.settings = settings
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
        return sorted(set(ids))

    async def has_asset(self, org: str, name: str) -> bool:
        """Whether `name` is the id of an asset no listing shows (a user may name it)."""
        if not _ASSET_NAME.fullmatch(name):
            return False
        try:
            device = await self.client.get_device(org, name)
        except (NotFound, Denied):
            return False
        self.devices.put((org, name), device)
        return True

    # -- an asset's category -------------------------------------------------------------

    async def entries(
        self,
        org: str,
        asset: str,
        category: str,
        *,
        known: KnownMeta = _none,
        where: str = "",
    ) -> list[Entry]:
        """The category's files, sized. `known` gives a metadata record still fresh
        (so a refresh asks getFileInfo only for what it does not know); `where` names
        the folder in the log."""
        if category == "feature":
            entries = await self._feature_entries(org, asset)
        else:
            entries = await self._ota_entries(org, asset)
        entries.extend(self._configured(org, asset, category))
        place = (org, asset, category)
        return await self._with_meta(place, entries, known, where)

    async def unlisted_file(self, org: str, asset: str, category: str, name: str) -> Entry | None:
        """The file whose fileUri's id is `name`, though no listing shows it."""
        if not _ID_NAME.fullmatch(name):
            return None
        uri = "enos-connect://" + name
        try:
            meta = await self.client.file_meta(FileRef(org, asset, category, uri))
        except NotFound:
            return None
        return Entry(name, (), uri, meta, {"uri": uri}, meta.create_time_ms)

    async def file_meta(self, ref: FileRef) -> FileMeta:
        """One file's record, asked for now (the tree decides when it is due)."""
        return await self.client.file_meta(ref)

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

    async def _with_meta(
        self, place: tuple[str, str, str], entries: list[Entry], known: KnownMeta, where: str
    ) -> list[Entry]:
        """Fill in sizes concurrently; drop files the server says no longer exist."""
        gone: set[int] = set()

        async def fill(i: int, e: Entry) -> None:
            meta = known(e.uri)
            if meta is not None:
                e.meta = meta
                return
            ref = FileRef(*place, e.uri)
            try:
                async with self._meta_limit:
                    e.meta = await self.client.file_meta(ref)
            except NotFound:
                log.debug("%s: %s is referenced but does not exist", where, e.uri)
                gone.add(i)
            except BadRecord as exc:
                # Not shown: nothing true could be said of it in `ls -l`.
                if e.uri not in self._bad_said:
                    self._bad_said.add(e.uri)
                    log.warning("%s: not showing %s: %s", where, e.wanted, exc)
                gone.add(i)
            except EnosfsError as exc:
                # Listed all the same; getattr will try again and report the error.
                log.warning("%s: no metadata for %s: %s", where, uri_id(e.uri), exc)

        async with trio.open_nursery() as nursery:
            for i, e in enumerate(entries):
                if e.meta is None:
                    nursery.start_soon(fill, i, e)
        for e in entries:
            if e.meta is not None and e.mtime_ms is None:
                e.mtime_ms = e.meta.create_time_ms
        return [e for i, e in enumerate(entries) if i not in gone]


def _is_file_uri(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and any(
        value.startswith(scheme) and len(value) > len(scheme) for scheme in _FILE_SCHEMES
    )
