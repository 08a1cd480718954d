"""What the emulated EnOS holds: apps, organisations, models, devices, firmware, files.

File bytes live on disk (one blob per fileUri) so the server can stream them at disk
speed; everything else is small and kept in memory, saved as JSON beside the blobs so a
restarted emulator finds what was uploaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from enosfs.emulator.content import GeneratedContent

FEATURE_KINDS = ("attributes", "measurepoints", "events")
STATE_FILE = "state.json"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Blob:
    uri: str
    org_id: str
    category: str
    size: int
    md5: str
    original_name: str
    create_time_ms: int
    sign_method: str = "md5"
    sign: str = ""
    # Set for a generated file (see content.py): its bytes come from this seed, made on
    # demand, and md5 and sign stay empty until State.settle() first needs them.
    gen: str = ""

    @property
    def content(self) -> GeneratedContent | None:
        return GeneratedContent(self.gen, self.size) if self.gen else None

    @property
    def blob_name(self) -> str:
        return hashlib.sha256(self.uri.encode()).hexdigest()[:32]


@dataclass
class Model:
    model_id: str
    name: str
    # kind -> identifier -> dataType
    features: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class Product:
    product_key: str
    name: str
    model_id: str


@dataclass
class Device:
    asset_id: str
    product_key: str
    device_key: str
    name: str
    model_id: str
    create_time_ms: int
    attributes: dict[str, Any] = field(default_factory=dict)
    # measurepoint id -> [time_ms, value]
    measurepoints: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Firmware:
    firmware_id: str
    product_key: str
    name: str
    version: str
    file_uri: str
    size: int
    sign_method: str
    sign: str
    create_time_ms: int
    desc: str = ""


@dataclass
class Org:
    org_id: str
    models: dict[str, Model] = field(default_factory=dict)
    products: dict[str, Product] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)
    firmwares: dict[str, Firmware] = field(default_factory=dict)

    def device_by_key(self, product_key: str, device_key: str) -> Device | None:
        for d in self.devices.values():
            if d.product_key == product_key and d.device_key == device_key:
                return d
        return None


@dataclass(frozen=True)
class Zeros:
    """A file of `size` zero bytes, kept sparse on disk: how tests get files above
    4 GiB without writing them. Give its md5 to skip hashing it."""

    size: int
    md5: str | None = None


class SeedError(ValueError):
    """The seed describes something the emulator cannot hold."""


class State:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.blob_dir = data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.apps: dict[str, str] = {}
        self.orgs: dict[str, Org] = {}
        self.blobs: dict[str, Blob] = {}
        self.fingerprint = ""

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, blob: Blob) -> Path:
        return self.blob_dir / blob.blob_name

    def settle(self, blob: Blob) -> Blob:
        """A generated blob with its md5 and sign filled in (computed once, when first
        asked for: hashing 20,000 files at start would make a big organisation slow to
        start); any other blob as it is."""
        content = blob.content
        if content is not None and not blob.md5:
            blob.md5, blob.sign = content.digests(blob.sign_method)
        return blob

    def new_uri(self, ext: str) -> str:
        while True:
            uri = f"enos-connect://{secrets.token_hex(8)}{ext}"
            if uri not in self.blobs:
                return uri

    def store(
        self,
        org_id: str,
        category: str,
        source: bytes | Path | Zeros,
        original_name: str,
        *,
        uri: str | None = None,
        create_time_ms: int | None = None,
        sign_method: str = "md5",
    ) -> Blob:
        """Keep a file's bytes and return its record; a Path is copied, bytes written."""
        ext = os.path.splitext(original_name)[1].lower()
        uri = uri or self.new_uri(ext)
        tmp = self.blob_dir / f".tmp-{secrets.token_hex(6)}"
        md5 = hashlib.md5()
        sha = hashlib.sha256()
        size = 0
        with open(tmp, "wb") as out:
            if isinstance(source, Zeros):
                out.truncate(source.size)
                size = source.size
                if source.md5 is None:
                    zeros = bytes(4 * 1024 * 1024)
                    left = size
                    while left > 0:
                        md5.update(zeros[: min(left, len(zeros))])
                        left -= min(left, len(zeros))
            elif isinstance(source, bytes):
                out.write(source)
                md5.update(source)
                sha.update(source)
                size = len(source)
            else:
                with open(source, "rb") as src:
                    while chunk := src.read(4 * 1024 * 1024):
                        out.write(chunk)
                        md5.update(chunk)
                        sha.update(chunk)
                        size += len(chunk)
        digest = source.md5 if isinstance(source, Zeros) and source.md5 else md5.hexdigest()
        blob = Blob(
            uri=uri,
            org_id=org_id,
            category=category,
            size=size,
            md5=digest,
            original_name=original_name,
            create_time_ms=create_time_ms or now_ms(),
            sign_method=sign_method,
            sign=sha.hexdigest() if sign_method == "sha256" else digest,
        )
        os.replace(tmp, self.blob_path(blob))
        self.blobs[uri] = blob
        return blob

    def delete_blob(self, uri: str) -> bool:
        blob = self.blobs.pop(uri, None)
        if blob is None:
            return False
        self.blob_path(blob).unlink(missing_ok=True)
        return True

    # -- persistence ---------------------------------------------------------------------

    def save(self) -> None:
        doc = {
            "fingerprint": self.fingerprint,
            "apps": self.apps,
            "blobs": [asdict(b) for b in self.blobs.values()],
            "orgs": [
                {
                    "org_id": o.org_id,
                    "models": [asdict(m) for m in o.models.values()],
                    "products": [asdict(p) for p in o.products.values()],
                    "devices": [asdict(d) for d in o.devices.values()],
                    "firmwares": [asdict(f) for f in o.firmwares.values()],
                }
                for o in self.orgs.values()
            ],
        }
        tmp = self.data_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.data_dir / STATE_FILE)

    @classmethod
    def load(cls, data_dir: Path) -> State:
        state = cls(data_dir)
        doc = json.loads((data_dir / STATE_FILE).read_text())
        state.fingerprint = doc.get("fingerprint", "")
        state.apps = dict(doc["apps"])
        state.blobs = {b["uri"]: Blob(**b) for b in doc["blobs"]}
        for o in doc["orgs"]:
            org = Org(o["org_id"])
            org.models = {m["model_id"]: Model(**m) for m in o["models"]}
            org.products = {p["product_key"]: Product(**p) for p in o["products"]}
            org.devices = {d["asset_id"]: Device(**d) for d in o["devices"]}
            org.firmwares = {f["firmware_id"]: Firmware(**f) for f in o["firmwares"]}
            state.orgs[org.org_id] = org
        return state


# -- seeds ------------------------------------------------------------------------------


def _det_hex(*parts: str, n: int = 16) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:n]


def generated_chunks(size: int, seed: str, chunk: int = 8 * 1024 * 1024) -> Iterator[bytes]:
    """Deterministic pseudo-random bytes, different in every block, for large test files."""
    rnd = random.Random(seed)
    left = size
    while left > 0:
        n = min(left, chunk)
        yield rnd.randbytes(n)
        left -= n


def generated_bytes(size: int, seed: str) -> bytes:
    return b"".join(generated_chunks(size, seed))


def _file_source(
    spec: Any, base: Path, where: str, name_key: str = "name"
) -> tuple[bytes | Path | Zeros, str]:
    """A seed's file value -> (its content, original file name)."""
    if not isinstance(spec, dict):
        raise SeedError(f"{where}: a file value must be a table with 'file', 'text' or 'bytes'")
    name = spec.get(name_key)
    if "file" in spec:
        path = (base / spec["file"]).resolve()
        if not path.is_file():
            raise SeedError(f"{where}: no such file {path}")
        return path, name or path.name
    if "text" in spec:
        return str(spec["text"]).encode("utf-8"), name or "file.txt"
    if "bytes" in spec:
        size = int(spec["bytes"])
        return generated_bytes(size, str(spec.get("seed", where))), name or "data.bin"
    if "zeros" in spec:
        return Zeros(int(spec["zeros"]), spec.get("md5")), name or "zeros.bin"
    raise SeedError(f"{where}: a file value needs 'file', 'text', 'bytes' or 'zeros'")


def _is_file_value(value: Any) -> bool:
    return isinstance(value, dict) and bool({"file", "text", "bytes", "zeros"} & set(value))


def build_state(seed: dict[str, Any], base: Path, data_dir: Path) -> State:
    """A State from a seed document; file values in it are stored as blobs.

    URIs derive from the seed (org, asset, feature), so the same seed always gives the
    same fileUris and a mount's names stay the same across emulator restarts.
    """
    state = State(data_dir)
    for app in seed.get("apps", []):
        state.apps[str(app["appKey"])] = str(app["appSecret"])
    t0 = 1_700_000_000_000
    for o in seed.get("orgs", []):
        org = Org(str(o["orgId"]))
        state.orgs[org.org_id] = org
        for m in o.get("models", []):
            model = Model(model_id=m["modelId"], name=m.get("name", m["modelId"]))
            for kind in FEATURE_KINDS:
                model.features[kind] = {str(k): str(v) for k, v in m.get(kind, {}).items()}
            org.models[model.model_id] = model
        for p in o.get("products", []):
            if p["modelId"] not in org.models:
                raise SeedError(f"product {p['productKey']}: unknown model {p['modelId']}")
            org.products[p["productKey"]] = Product(
                p["productKey"], p.get("name", p["productKey"]), p["modelId"]
            )
        for i, d in enumerate(o.get("devices", [])):
            product = org.products.get(d["productKey"])
            if product is None:
                raise SeedError(f"device {d.get('assetId')}: unknown product {d['productKey']}")
            asset_id = d.get("assetId") or _det_hex(org.org_id, "asset", str(i), n=8)
            device = Device(
                asset_id=asset_id,
                product_key=product.product_key,
                device_key=d.get("deviceKey", asset_id),
                name=d.get("name", asset_id),
                model_id=product.model_id,
                create_time_ms=int(d.get("createTime", t0 + i * 1000)),
            )
            for kind, target in (
                ("attributes", device.attributes),
                ("measurepoints", device.measurepoints),
            ):
                for ident, value in d.get(kind, {}).items():
                    where = f"device {asset_id} {kind}.{ident}"
                    ts = device.create_time_ms
                    if _is_file_value(value):
                        source, name = _file_source(value, base, where)
                        ext = os.path.splitext(name)[1].lower()
                        uri = value.get("uri") or (
                            f"enos-connect://{_det_hex(org.org_id, asset_id, kind, ident)}{ext}"
                        )
                        blob = state.store(
                            org.org_id, "feature", source, name, uri=uri, create_time_ms=ts
                        )
                        value = blob.uri
                    if kind == "attributes":
                        target[ident] = value
                    else:
                        target[ident] = [ts, value]
            org.devices[asset_id] = device
        for i, f in enumerate(o.get("firmwares", [])):
            if f["productKey"] not in org.products:
                raise SeedError(f"firmware {f.get('name')}: unknown product {f['productKey']}")
            where = f"firmware {f.get('name')}"
            source, name = _file_source(f, base, where, name_key="fileName")
            ext = os.path.splitext(name)[1].lower()
            fid = f.get("firmwareId") or _det_hex(
                org.org_id, "fw", f["productKey"], f["name"], f["version"], n=24
            )
            uri = f.get("uri") or f"enos-connect://{_det_hex(org.org_id, 'fw', fid)}{ext}"
            method = f.get("signMethod", "md5")
            created = int(f.get("createTime", t0 + i * 1000))
            blob = state.store(
                org.org_id, "ota", source, name, uri=uri, create_time_ms=created, sign_method=method
            )
            org.firmwares[fid] = Firmware(
                firmware_id=fid,
                product_key=f["productKey"],
                name=f["name"],
                version=str(f["version"]),
                file_uri=blob.uri,
                size=blob.size,
                sign_method=method,
                sign=blob.sign,
                create_time_ms=created,
                desc=f.get("desc", ""),
            )
    return state


def load_seed(path: Path) -> tuple[dict[str, Any], Path]:
    """A seed document and the folder its relative file paths start from."""
    if path.is_dir():
        path = path / "seed.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SeedError(f"no seed file at {path}") from None
    except ValueError as exc:
        raise SeedError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SeedError(f"{path}: a seed must be a JSON object")
    return doc, path.parent


def reset_dir(data_dir: Path) -> None:
    """Empty a data folder we are about to fill, keeping the folder itself."""
    for child in (data_dir / "blobs", data_dir / STATE_FILE):
        if child.is_dir():
            shutil.rmtree(child)
        elif child.exists():
            child.unlink()
