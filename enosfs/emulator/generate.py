"""Generated organisations: `--seed generate:devices=5000,attrs=2,...` builds a big one.

Real organisations hold thousands of devices and tens of thousands of files; a seed
file listing them all would be unwieldy, so a one-line spec describes the shape and
this module makes the rest, deterministically: the same spec gives the same ids, names,
sizes and bytes on every machine. File bytes are made on demand (content.py), so a
20,000-file organisation starts in about a second and takes no disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from enosfs.emulator.demo import DEMO_APP_KEY, DEMO_APP_SECRET, DEMO_ORG
from enosfs.emulator.state import (
    Blob,
    Device,
    Firmware,
    Model,
    Org,
    Product,
    SeedError,
    State,
)
from enosfs.errors import ConfigError
from enosfs.values import parse_size

PREFIX = "generate:"
T0 = 1_700_000_000_000
# Identifiers real models use for files, then numbered ones.
ATTRIBUTE_NAMES = (
    "model_file",
    "nameplate_photo",
    "commissioning_docs",
    "datasheet",
    "wiring_diagram",
    "maintenance_report",
)
ATTRIBUTE_EXTS = (".json", ".png", ".zip", ".pdf", ".svg", ".docx")
POINT_NAMES = ("scada_export", "event_log", "vibration_raw", "oscillogram")
POINT_EXTS = (".csv", ".db", ".bin", ".dat")


@dataclass(frozen=True)
class GenerateSpec:
    """The shape of a generated organisation; every key of the spec is a field here."""

    devices: int = 100
    models: int = 1
    products: int = 1
    attrs: int = 2  # FILE attributes per model
    points: int = 1  # FILE measurement points per model (queryLatest values)
    firmware: int = 1  # firmware versions per product
    # Sizes are drawn between these bounds, skewed towards the small end: most files a
    # device holds are small, a few are large. Firmware sizes are drawn evenly.
    file_min: int = 4 * 1024
    file_max: int = 3 * 1024 * 1024
    firmware_min: int = 2 * 1024 * 1024
    firmware_max: int = 6 * 1024 * 1024
    seed: int = 1  # another seed, another organisation of the same shape
    lark: int = 0  # percent of device files kept in object storage (enos-lark://)

    def canonical(self) -> str:
        """The spec with every default written out: equal organisations, equal text."""
        return json.dumps(asdict(self), sort_keys=True)


_SIZES = {"file_min", "file_max", "firmware_min", "firmware_max"}


def parse_spec(text: str) -> GenerateSpec:
    """'generate:devices=5000,attrs=2' -> GenerateSpec; a SeedError names a bad part."""
    body = text[len(PREFIX) :] if text.startswith(PREFIX) else text
    known = {f.name for f in fields(GenerateSpec)}
    values: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise SeedError(f"generate: {item!r} is not key=value")
        if key not in known:
            raise SeedError(f"generate: unknown key {key!r} (keys: {', '.join(sorted(known))})")
        if key in _SIZES:
            try:
                values[key] = parse_size(value.strip(), f"generate: {key}")
            except ConfigError as exc:
                raise SeedError(str(exc)) from None
        else:
            try:
                values[key] = int(value)
            except ValueError:
                raise SeedError(f"generate: {key} takes a whole number, not {value!r}") from None
        if values[key] < 0:
            raise SeedError(f"generate: {key} must not be negative")
    spec = GenerateSpec(**values)
    for key in ("models", "products"):
        if getattr(spec, key) < 1:
            raise SeedError(f"generate: {key} must be at least 1")
    if spec.file_min > spec.file_max or spec.firmware_min > spec.firmware_max:
        raise SeedError("generate: a size's _min must not be above its _max")
    if spec.lark > 100:
        raise SeedError("generate: lark is a percentage, 0 to 100")
    if spec.firmware_min < 64:
        raise SeedError("generate: firmware_min must be at least 64 bytes")
    return spec


def _hex(*parts: object, n: int = 16) -> str:
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:n]


def _skewed_size(rnd: random.Random, low: int, high: int) -> int:
    """Log-scale between low and high, skewed to the small end (4 KiB..3 MiB: median
    about 6 KiB, one in ten above 300 KiB, mean about 140 KiB): a realistic mix that
    keeps sizing 15,000 files (the emulator hashes each once) a matter of seconds."""
    if high <= max(low, 1):
        return low
    low1 = max(low, 1)
    return max(low, round(low1 * math.exp(math.log(high / low1) * rnd.random() ** 4)))


def _scheme(spec: GenerateSpec, *parts: object) -> str:
    """enos-lark:// for about spec.lark percent of device files, the same ones for the
    same spec (chosen by hash, not drawn: sizes keep their draws), else enos-connect://."""
    if spec.lark and int(_hex(*parts, n=8), 16) % 100 < spec.lark:
        return "enos-lark://"
    return "enos-connect://"


def _identifiers(names: tuple[str, ...], exts: tuple[str, ...], n: int) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        name = names[i] if i < len(names) else f"{names[i % len(names)]}_{i // len(names) + 1}"
        out.append((name, exts[i % len(exts)]))
    return out


def build_generated(spec: GenerateSpec, data_dir: Path) -> State:
    """The organisation a spec describes, with the demo's org id and app (so the
    settings that reach the demo reach it too). No file bytes are written."""
    state = State(data_dir)
    state.apps[DEMO_APP_KEY] = DEMO_APP_SECRET
    org = Org(DEMO_ORG)
    state.orgs[org.org_id] = org
    s = spec.seed
    attrs = _identifiers(ATTRIBUTE_NAMES, ATTRIBUTE_EXTS, spec.attrs)
    points = _identifiers(POINT_NAMES, POINT_EXTS, spec.points)
    for m in range(spec.models):
        model = Model(model_id=f"gen_model_{m + 1}", name=f"Generated model {m + 1}")
        model.features["attributes"] = {"rated_power": "DOUBLE"} | {a: "FILE" for a, _ in attrs}
        model.features["measurepoints"] = {"wind_speed": "DOUBLE"} | {p: "FILE" for p, _ in points}
        model.features["events"] = {}
        org.models[model.model_id] = model
    models = list(org.models.values())
    for p in range(spec.products):
        key = f"pkGen{p + 1:03d}"
        org.products[key] = Product(
            key, f"Generated product {p + 1}", models[p % len(models)].model_id
        )
    products = list(org.products.values())

    def blob(uri: str, category: str, name: str, size: int, created: int, method: str) -> Blob:
        b = Blob(uri, org.org_id, category, size, "", name, created, method, "", gen=f"{s}|{uri}")
        state.blobs[uri] = b
        return b

    for i in range(spec.devices):
        product = products[i % len(products)]
        asset_id = _hex(s, "asset", i, n=12)
        while asset_id in org.devices:  # deterministic, as the order is
            asset_id = _hex(s, "asset", i, asset_id, n=12)
        created = T0 + i * 1000
        device = Device(
            asset_id=asset_id,
            product_key=product.product_key,
            device_key=f"dev{i + 1:06d}",
            name=f"Generated device {i + 1}",
            model_id=product.model_id,
            create_time_ms=created,
        )
        rnd = random.Random(f"{s}\x1fsizes\x1f{asset_id}")
        device.attributes["rated_power"] = 2000.0 + 500 * (i % 5)
        for ident, ext in attrs:
            scheme = _scheme(spec, s, "lark", asset_id, "attributes", ident)
            uri = f"{scheme}{_hex(org.org_id, asset_id, 'attributes', ident)}{ext}"
            size = _skewed_size(rnd, spec.file_min, spec.file_max)
            blob(uri, "feature", f"{ident}-{device.device_key}{ext}", size, created, "md5")
            device.attributes[ident] = uri
        device.measurepoints["wind_speed"] = [created, round(7.5 + (i % 7) * 0.5, 1)]
        for ident, ext in points:
            scheme = _scheme(spec, s, "lark", asset_id, "measurepoints", ident)
            uri = f"{scheme}{_hex(org.org_id, asset_id, 'measurepoints', ident)}{ext}"
            size = _skewed_size(rnd, spec.file_min, spec.file_max)
            blob(uri, "feature", f"{ident}-{device.device_key}{ext}", size, created, "md5")
            device.measurepoints[ident] = [created, uri]
        org.devices[asset_id] = device
    for p, product in enumerate(products):
        rnd = random.Random(f"{s}\x1ffirmware\x1f{product.product_key}")
        method = "md5" if p % 2 == 0 else "sha256"
        for v in range(spec.firmware):
            fid = _hex(s, org.org_id, "fw", product.product_key, v, n=24)
            uri = f"enos-connect://{_hex(org.org_id, 'fw', fid)}.bin"
            size = rnd.randint(spec.firmware_min, spec.firmware_max)
            version = f"1.{v}.0"
            created = T0 + (p * spec.firmware + v) * 1000
            b = blob(uri, "ota", f"controller-{version}.bin", size, created, method)
            org.firmwares[fid] = Firmware(
                firmware_id=fid,
                product_key=product.product_key,
                name=f"controller-{product.product_key}",
                version=version,
                file_uri=b.uri,
                size=b.size,
                sign_method=method,
                sign="",  # filled in by the first search that shows it (State.settle)
                create_time_ms=created,
            )
    return state
