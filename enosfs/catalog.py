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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import trio

from enosfs.api import BadRecord, Device, FileFeatures, FileMeta, FileRef, Firmware
from enosfs.config import Settings
from enosfs.errors import Denied, EnosfsError, NotFound
from enosfs.expiring import Expiring
from enosfs.naming import feature_file_name, firmware_file_name, safe_name, uri_id
from enosfs.priority import Ahead, PriorityLimiter, current, needed, speculative, under
from enosfs.settings_schema import default
from enosfs.signedurls import LARK_SCHEME
from enosfs.source import Listings
from enosfs.views import Known, known_of

if TYPE_CHECKING:
    from enosfs.metastore import MetaStore, OrgRecord

log = logging.getLogger(__name__)

# getFileInfo calls of one mount in flight at once, for sizing folders, by default: as
# many as the API bound allows (network.max_api_concurrency), which adapts below it.
META_CONCURRENCY = default("max_api_concurrency")
# Thing models fetched ahead when an organisation is listed (Catalog.models_ahead).
MODELS_AHEAD = 16
_ID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)?")
_ASSET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Files EnOS keeps itself, and files kept in object storage (read through a signed
# URL: signedurls.py); both are listed alike.
_FILE_SCHEMES = ("enos-connect://", LARK_SCHEME)


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
        # In lanes (priority.py): the size someone waits for passes the sizes fetched ahead.
        self._meta_limit = PriorityLimiter(settings.max_api_concurrency)
        self._offered: dict[str, tuple[list[Device], float]] = {}  # see offer_devices
        # Thing models being asked, and the standing they were asked with (priority.py).
        self._model_flights: dict[tuple[str, str], tuple[trio.Event, Ahead | None]] = {}
        # org -> what its last device search said people name its devices by (views.py);
        # None where it may not search (Denied, or `discover` off): no views there.
        self.known: dict[str, list[Known] | None] = {}
        # org -> {asset id: (product key, device key)} of the devices configured files
        # name by key that search found: their files go in that asset's folder.
        self._keyed_assets: dict[str, dict[str, tuple[str, str]]] = {}

    # -- an organisation -----------------------------------------------------------------

    async def asset_ids(self, org: str) -> list[str]:
        """The org's assets: found by device search (where enabled) and configured."""
        settings = next(o for o in self.settings.orgs if o.org_id == org)
        ids: list[str] = []
        known: list[Known] | None = None
        if settings.discover:
            try:
                devices = self._offered_devices(org)
                if devices is None:
                    devices = await self.client.search_devices(org)
                known = known_of(devices)
            except Denied as exc:
                self._say_denied(f"device search in {org}", exc)
                devices = []
            now = self.devices.clock()
            for dev in devices:
                self.devices.put((org, dev.asset_id), dev, at=now)
                ids.append(dev.asset_id)
        ids.extend(settings.assets)
        ids.extend(f.asset for f in self.settings.files if f.org == org and f.asset)
        found = sorted(set(ids))
        self._learn(org, known)
        if self.store is not None:
            self.store.save_assets(org, found, self.wall(), known)
        return found

    def offer_devices(self, org: str, devices: list[Device]) -> None:
        """Every device of org, just found by a search of the mount's own (its check of
        the organisation): the first listing takes them instead of searching again,
        if it comes while they would still be fresh."""
        now = self.clock()
        self._offered[org] = (devices, now)
        for device in devices:
            self.devices.put((org, device.asset_id), device, at=now)

    def _offered_devices(self, org: str) -> list[Device] | None:
        offered = self._offered.pop(org, None)
        if offered is None or self.clock() - offered[1] >= self.settings.metadata_ttl:
            return None
        return offered[0]

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
        self,
        refs: list[FileRef],
        where: str = "",
        each: Callable[[str, FileMeta | EnosfsError], None] | None = None,
        standing: Mapping[str, Ahead] | None = None,
    ) -> dict[str, FileMeta | EnosfsError]:
        """fileUri -> its record, or why there is none, for a folder's files at once:
        `ls -l` asks for every entry right after the first, so the first pays one round
        trip for all. Concurrent within the API bound's ceiling (shared by every
        folder; the bound itself adapts below it); each fileUri is asked once however
        many names show it. `where` names the folder in the log; `each` is told every
        answer as it comes, for a caller waiting for one file of the batch.

        While the client is still learning whether the server has getFileInfo, its
        first call goes alone and the others wait (api.py): that first call is the
        first ref's, the file a caller is waiting for; it takes the first slot in any
        case. `standing` (fileUri -> token) marks the calls made ahead of need
        (priority.py): they queue behind any call someone waits for, and the token
        hurries one when someone comes to wait for it."""
        out: dict[str, FileMeta | EnosfsError] = {}

        async def fill(
            ref: FileRef, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            token = standing.get(ref.uri) if standing is not None else None
            try:
                with under(token):
                    async with self._meta_limit:
                        task_status.started()
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
            if each is not None:
                each(ref.uri, out[ref.uri])

        todo = list({ref.uri: ref for ref in refs}.values())
        expect = getattr(self.client, "expect_calls", None)  # EnosClient's; fakes have none
        if expect is not None and len(todo) > 1:
            expect(len(todo))
        if todo and getattr(self.client, "file_info_supported", True) is None:
            await fill(todo.pop(0))
        async with trio.open_nursery() as nursery:
            if todo:
                await nursery.start(fill, todo.pop(0))
            for ref in todo:
                nursery.start_soon(fill, ref)
        return out

    async def unlisted_file(
        self, org: str, asset: str, category: str, name: str, keys: tuple[str, str] = ("", "")
    ) -> Entry | None:
        """The file whose fileUri's id is `name`, though no listing shows it (of a
        device known by asset id, or only by `keys`)."""
        if not self.could_be_file_id(name):
            return None
        uri = "enos-connect://" + name
        try:
            meta = await self.file_meta(FileRef(org, asset, category, uri, *keys))
        except NotFound:
            return None
        return Entry(name, (), uri, meta, {"uri": uri}, meta.create_time_ms)

    async def file_meta(self, ref: FileRef) -> FileMeta:
        """One file's record, asked for now (the tree decides when it is due)."""
        meta = await self.client.file_meta(ref)
        if self.store is not None and ref.asset:  # (one known by keys only is not kept)
            self.store.save_meta((ref.org, ref.asset, ref.category), meta, self.wall())
        return meta

    # -- what an earlier mount kept ------------------------------------------------------

    async def kept_assets(self, org: str) -> tuple[list[str], float] | None:
        """The org's asset ids as the store kept them, and when (in `clock`) they were
        listed; once per mount (the first listing), None where there are none. What
        search said of the devices then comes back too, into `known`."""
        kept = await self._kept_of(org)
        if kept is None or kept.assets is None:
            return None
        stored, kept.assets = kept.assets, None
        self._learn(org, kept.known)
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

    async def learn_sizing(self, org: str, devices: list[Device]) -> None:
        """Whether the server has getFileInfo, asked at mount about one file the device
        search showed: a folder's first `ls -l` then sends its sizes all at once, rather
        than one alone first to learn it (a round trip far away). One call a mount;
        a failure is left to the listing that needs a size."""
        if getattr(self.client, "file_info_supported", True) is not None:
            return
        for d in devices:
            uri = next((v for v in d.attributes.values() if _is_file_uri(v)), None)
            if uri is not None and not uri.startswith(LARK_SCHEME):
                try:
                    await self.client.file_meta(FileRef(org, d.asset_id, "feature", uri))
                except EnosfsError as exc:
                    log.debug("getFileInfo not learnt at mount: %s", exc)
                return

    async def models_ahead(self, org: str, asset_ids: list[str]) -> None:
        """Fetch, all at once, the thing models of the org's listed devices that are not
        known yet: the first listing of any of its assets' feature folders then waits
        for no model (a round trip less before its first file). A few models serve
        thousands of devices; an org with more than MODELS_AHEAD of them is left to
        the walk that needs them. Failures are left to the listing that needs it."""
        wanted: dict[str, None] = {}
        for asset in asset_ids:
            device = self.devices.fresh((org, asset))
            model_id = device.model_id if device is not None else ""
            if model_id and self.models.fresh((org, model_id)) is None:
                wanted[model_id] = None
        if not wanted or len(wanted) > MODELS_AHEAD:
            return

        async def one(model_id: str) -> None:
            try:
                with speculative():  # a listing that comes to need it hurries it
                    await self._features(org, model_id)
            except EnosfsError as exc:
                log.debug("thing model %s not fetched ahead: %s", model_id, exc)

        async with trio.open_nursery() as nursery:
            for model_id in wanted:
                nursery.start_soon(one, model_id)

    async def _features(self, org: str, model_id: str) -> FileFeatures:
        key = (org, model_id)
        cached = self.models.fresh(key)
        if cached is not None:
            return cached
        flight = self._model_flights.get(key)
        if flight is not None:  # asked already (models_ahead): one call for both
            needed(flight[1])
            await flight[0].wait()
            cached = self.models.fresh(key)
            if cached is not None:
                return cached
        done = trio.Event()
        self._model_flights[key] = (done, current())
        try:
            try:
                features = await self.client.get_file_features(org, model_id)
            except (Denied, NotFound) as exc:
                self._say_denied(f"thing model {model_id}", exc)
                features = FileFeatures()
            self.models.put(key, features)
        finally:
            if self._model_flights.get(key, (None,))[0] is done:
                del self._model_flights[key]
            done.set()
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

    # -- devices known by key ------------------------------------------------------------

    def _learn(self, org: str, known: list[Known] | None) -> None:
        """What search said of the org's devices: for the views, and for configured
        files that name their device by key."""
        self.known[org] = known
        wanted = self._keyed_devices(org)
        self._keyed_assets[org] = {
            k.asset_id: (k.product_key, k.device_key)
            for k in known or ()
            if (k.product_key, k.device_key) in wanted
        }

    def _keyed_devices(self, org: str) -> set[tuple[str, str]]:
        return {
            (f.product_key, f.device_key)
            for f in self.settings.files
            if f.org == org and not f.asset
        }

    def keyed_only(self, org: str) -> list[tuple[str, str]]:
        """(product key, device key) of the devices configured files name by key that
        no search found (it may not search, or they are not there): they have no asset
        id to go by, and are shown by their keys alone (by-key/)."""
        found = set(self._keyed_assets.get(org, {}).values())
        return sorted(self._keyed_devices(org) - found)

    def keyed_entries(self, org: str, keys: tuple[str, str], category: str) -> list[Entry]:
        """The files of a device known only by its keys: those the configuration names
        (there is no asset id to discover others by)."""
        return self._configured(org, "", category, keys)

    def _configured(
        self, org: str, asset: str, category: str, keys: tuple[str, str] | None = None
    ) -> list[Entry]:
        if keys is None:
            keys = self._keyed_assets.get(org, {}).get(asset)
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
            if (f.org, f.category) == (org, category)
            and (
                f.asset == asset
                if f.asset
                else keys is not None and (f.product_key, f.device_key) == keys
            )
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
