"""An in-process EnOS organisation for the catalog: devices, thing models, latest values,
firmware and file records held in dicts, faults scripted per test, every call counted.

It stands where EnosClient stands (enosfs.source.Listings), so the catalog's tests run in
the test process, without an emulator, sockets or a mount, and with trio's autojump
clock where they wait. Like tests/fake_source.py it models the client as its caller sees
it, after the client's own work: pages already joined, a 429 arriving as the
RateLimited the client raises once its retries are spent, an unusable record as the
BadRecord its parser raises. Whether the fake and the real client agree is checked once,
on the demo organisation (test_catalog.py, `from_emulator_state`).

Calls are counted under the emulator's request kinds (`devices.search`, `devices.get`,
`thing-models.get`, `measurepoints.queryLatest`, `ota-firmwares.search`,
`files.getFileInfo`), and `peak` keeps the most calls of a kind that were in flight at
once, so a test can see a concurrency bound hold.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio

from enosfs.api import BadRecord, Device, FileFeatures, FileMeta, FileRef, Firmware
from enosfs.errors import DeadlineError, Denied, NotFound, RateLimited
from enosfs.naming import uri_id
from tests.fake_source import take

ORG = "o00000000000000001"
FAULT_KINDS = ("deny", "missing", "rate_limit", "bad_record", "latency")


@dataclass
class ApiFault:
    """One scripted misbehaviour, for the calls whose kind matches `match` (fnmatch) and,
    if `about` is set, that name it (an org, asset, model, product key or fileUri); only
    `times` of them if set.

    | kind       | what the catalog sees                                               |
    |------------|---------------------------------------------------------------------|
    | deny       | Denied: the app lacks the permission (EnOS 99403)                    |
    | missing    | NotFound                                                            |
    | rate_limit | RateLimited, as the client raises it once its retries are spent      |
    | bad_record | BadRecord: the record cannot be represented (a size no file can have) |
    | latency    | the answer comes `seconds` later; past the deadline, DeadlineError  |
    """

    kind: str
    match: str = "*"
    about: str | None = None
    seconds: float = 0.0
    times: int | None = None
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")


class FakeListings:
    """An organisation behind the Listings protocol, set up by a test.

    `latency` delays every answer (so calls overlap and `peak` means something); the
    deadline `timeout` is what a slow answer runs into, as the client's policy is.
    """

    def __init__(self, *, timeout: float = 10.0, latency: float = 0.0) -> None:
        self.timeout = timeout
        self.latency = latency
        self.faults: list[ApiFault] = []
        self.counts: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self._in_flight: Counter[str] = Counter()
        self.devices: dict[str, dict[str, Device]] = {}
        self.models: dict[tuple[str, str], FileFeatures] = {}
        self.latest: dict[tuple[str, str], dict[str, Any]] = {}
        self.firmwares: dict[tuple[str, str], list[Firmware]] = {}
        self.metas: dict[str, FileMeta] = {}
        self._uris = 0

    # -- what a test sets up -----------------------------------------------------------

    def model(
        self,
        org: str,
        model_id: str,
        *,
        attributes: tuple[str, ...] = (),
        measurepoints: tuple[str, ...] = (),
        events: tuple[str, ...] = (),
    ) -> None:
        """A thing model, by its FILE-typed features (sorted, as the client gives them)."""
        self.models[(org, model_id)] = FileFeatures(
            tuple(sorted(attributes)), tuple(sorted(measurepoints)), tuple(sorted(events))
        )

    def device(
        self,
        org: str,
        asset: str,
        *,
        model_id: str = "",
        product_key: str = "",
        attributes: dict[str, Any] | None = None,
        latest: dict[str, Any] | None = None,
    ) -> Device:
        """A device; `attributes` and `latest` map feature ids to values (a fileUri, a
        number...), as EnOS keeps them."""
        dev = Device(
            asset_id=asset,
            product_key=product_key,
            device_key=asset.lower(),
            name=asset,
            model_id=model_id,
            attributes=dict(attributes or {}),
            create_time_ms=1_700_000_000_000,
        )
        self.devices.setdefault(org, {})[asset] = dev
        self.latest[(org, asset)] = dict(latest or {})
        return dev

    def file(self, size: int, ext: str = ".bin", *, create_time_ms: int | None = None) -> str:
        """A new file's record; its fileUri."""
        self._uris += 1
        uri = f"enos-connect://{self._uris:016x}{ext}"
        self.metas[uri] = FileMeta(
            uri=uri,
            size=size,
            md5=hashlib.md5(uri.encode()).hexdigest(),
            create_time_ms=create_time_ms,
            sign_method="md5",
        )
        return uri

    def firmware(
        self,
        org: str,
        product_key: str,
        name: str,
        version: str,
        size: int,
        *,
        listed_size: bool = True,
    ) -> Firmware:
        """A firmware file; `listed_size` False: the search leaves its size out, so only
        getFileInfo tells it."""
        uri = self.file(size, ".bin", create_time_ms=1_700_000_100_000)
        sign = self.metas[uri].md5
        fw = Firmware(
            firmware_id=f"fw-{len(self.metas)}",
            product_key=product_key,
            name=name,
            version=version,
            url=uri,
            size=size if listed_size else None,
            sign_method="md5",
            sign=sign,
            create_time_ms=1_700_000_100_000,
        )
        self.firmwares.setdefault((org, product_key), []).append(fw)
        return fw

    @classmethod
    def from_emulator_state(cls, state: dict[str, Any], org_id: str) -> FakeListings:
        """The emulator's organisation (its state.json), as the client would read it."""
        fake = cls()
        org = next(o for o in state["orgs"] if o["org_id"] == org_id)
        for m in org["models"]:
            files = {
                kind: tuple(
                    i for i, t in m["features"].get(kind, {}).items() if t.upper() == "FILE"
                )
                for kind in ("attributes", "measurepoints", "events")
            }
            fake.model(org_id, m["model_id"], **files)
        for d in org["devices"]:
            fake.devices.setdefault(org_id, {})[d["asset_id"]] = Device(
                asset_id=d["asset_id"],
                product_key=d["product_key"],
                device_key=d["device_key"],
                name=d["name"],
                model_id=d["model_id"],
                attributes=dict(d["attributes"]),
                create_time_ms=d["create_time_ms"],
            )
            fake.latest[(org_id, d["asset_id"])] = {
                ident: value for ident, (_, value) in d["measurepoints"].items()
            }
        for f in org["firmwares"]:
            fake.firmwares.setdefault((org_id, f["product_key"]), []).append(
                Firmware(
                    firmware_id=f["firmware_id"],
                    product_key=f["product_key"],
                    name=f["name"],
                    version=f["version"],
                    url=f["file_uri"],
                    size=f["size"],
                    sign_method=f["sign_method"].lower() or None,
                    sign=f["sign"].lower() or None,
                    create_time_ms=f["create_time_ms"],
                )
            )
        for b in state["blobs"]:
            if b["org_id"] == org_id:
                fake.metas[b["uri"]] = FileMeta(
                    uri=b["uri"],
                    size=b["size"],
                    md5=b["md5"] or None,
                    original_name=b["original_name"] or None,
                    create_time_ms=b["create_time_ms"],
                    sign_method=b["sign_method"].lower() or None,
                    sign=b["sign"].lower() or None,
                )
        return fake

    # -- the Listings protocol ---------------------------------------------------------

    async def search_devices(self, org: str) -> list[Device]:
        await self._call("devices.search", (org,), f"device search in {org}")
        return list(self.devices.get(org, {}).values())

    async def get_device(self, org: str, asset_id: str) -> Device:
        what = f"device {asset_id}"
        await self._call("devices.get", (org, asset_id), what)
        dev = self.devices.get(org, {}).get(asset_id)
        if dev is None:
            raise NotFound(11404, "Device not found", http_status=200, what=what)
        return dev

    async def get_file_features(self, org: str, model_id: str) -> FileFeatures:
        what = f"thing model {model_id}"
        await self._call("thing-models.get", (org, model_id), what)
        features = self.models.get((org, model_id))
        if features is None:
            raise NotFound(17404, "Model not found", http_status=200, what=what)
        return features

    async def query_latest(self, org: str, asset_id: str, ids: list[str]) -> dict[str, Any]:
        what = f"latest measurement points of {asset_id}"
        await self._call("measurepoints.queryLatest", (org, asset_id), what)
        values = self.latest.get((org, asset_id), {})
        return {i: values[i] for i in ids if i in values}

    async def search_firmwares(self, org: str, product_key: str) -> list[Firmware]:
        what = f"firmware search for product {product_key}"
        await self._call("ota-firmwares.search", (org, product_key), what)
        return list(self.firmwares.get((org, product_key), []))

    async def file_meta(self, ref: FileRef) -> FileMeta:
        what = f"file info {uri_id(ref.uri)}"
        await self._call("files.getFileInfo", (ref.org, ref.asset, ref.uri), what)
        meta = self.metas.get(ref.uri)
        if meta is None:
            raise NotFound(99404, "file not found", http_status=200, what=what)
        return meta

    # -- inside ------------------------------------------------------------------------

    async def _call(self, kind: str, about: tuple[str, ...], what: str) -> None:
        """Count the call, then wait and fail as the faults that match it say."""
        self.counts[kind] += 1
        self._in_flight[kind] += 1
        self.peak[kind] = max(self.peak[kind], self._in_flight[kind])
        try:
            faults = self._take(kind, about)
            delay = self.latency + sum(f.seconds for f in faults if f.kind == "latency")
            if delay >= self.timeout:
                await trio.sleep(self.timeout)
                raise DeadlineError(f"{what}: no answer within {self.timeout:g}s")
            await trio.sleep(delay)
            for fault in faults:
                if fault.kind == "deny":
                    raise Denied(99403, "Denied resource", http_status=200, what=what)
                if fault.kind == "missing":
                    raise NotFound(99404, "not found", http_status=200, what=what)
                if fault.kind == "rate_limit":
                    raise RateLimited("rate limit exceeded", None, http_status=429, what=what)
                if fault.kind == "bad_record":
                    raise BadRecord(f"{what}: fileSize -1 is not a file size")
        finally:
            self._in_flight[kind] -= 1

    def _take(self, kind: str, about: tuple[str, ...]) -> list[ApiFault]:
        return take(self.faults, kind, about)
