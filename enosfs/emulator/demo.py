"""The demo organisation: a few products and assets holding files of many kinds.

Every file is made here, deterministically, so the demo's names, sizes and checksums are
the same on every machine: a CSV, a JSON model file, a PNG, a zip, a SQLite database, an
empty file, a large binary, firmware images signed with md5 and sha256, and a file kept
in object storage (`enos-lark://`, read through a signed URL).
"""

from __future__ import annotations

import io
import json
import random
import sqlite3
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from enosfs.emulator.state import generated_chunks

DEMO_ORG = "o16800000000001"
DEMO_APP_KEY = "demo-app"
DEMO_APP_SECRET = "demo-secret-not-for-production"
LARGE_DEFAULT = 200 * 1024 * 1024
# The demo's file kept in object storage: several blocks long, an odd size.
LARK_URI = "enos-lark://lark-demo/5e1d0c2a9b7f4e61.dat"
LARK_SIZE = 5 * 1024 * 1024 + 4321


def png(width: int, height: int) -> bytes:
    """A small valid RGB PNG: a colour gradient."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        for x in range(width):
            rows += bytes((x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), 160))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 9))
        + chunk(b"IEND", b"")
    )


def scada_csv(asset: str, rows: int) -> bytes:
    rnd = random.Random(asset)
    lines = ["timestamp,wind_speed_ms,power_kw,rotor_rpm,nacelle_temp_c"]
    t = 1_700_000_000
    for i in range(rows):
        ws = max(0.0, rnd.gauss(8.5, 2.5))
        power = min(3000.0, max(0.0, 0.5 * 1.225 * 5027 * ws**3 * 0.42 / 1000))
        lines.append(f"{t + 600 * i},{ws:.2f},{power:.1f},{ws * 1.6:.2f},{rnd.uniform(18, 42):.1f}")
    return ("\n".join(lines) + "\n").encode()


def model_json(asset: str, rated_kw: int) -> bytes:
    doc = {
        "asset": asset,
        "manufacturer": "Envision",
        "model": f"EN-{rated_kw // 1000}.{rated_kw % 1000 // 100}-156",
        "rated_power_kw": rated_kw,
        "hub_height_m": 120,
        "rotor_diameter_m": 156,
        "power_curve": [[ws, round(min(rated_kw, 0.22 * ws**3 * 35), 1)] for ws in range(3, 26)],
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


def docs_zip(asset: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in (
            ("README.txt", f"Commissioning documents for {asset}.\n"),
            ("checklist.csv", "step,done\nmechanical,yes\nelectrical,yes\nscada,yes\n"),
            ("report/summary.md", f"# {asset}\n\nCommissioned without findings.\n"),
        ):
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 15, 12, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, text)
    return buf.getvalue()


def event_db(path: Path, asset: str, events: int) -> None:
    rnd = random.Random("events-" + asset)
    con = sqlite3.connect(path)
    with con:
        con.execute(
            "create table events (id integer primary key, ts integer, code integer, "
            "severity text, message text)"
        )
        con.executemany(
            "insert into events (ts, code, severity, message) values (?, ?, ?, ?)",
            [
                (1_700_000_000 + i * 97, code, sev, f"{sev} {code} on {asset}")
                for i in range(events)
                for code, sev in [
                    (rnd.choice([101, 205, 309, 412]), rnd.choice(["info", "warn", "error"]))
                ]
            ],
        )
    con.close()


def firmware_image(name: str, size: int) -> bytes:
    header = f"ENVFW1 {name}\n".encode()
    return header + random.Random(name).randbytes(size - len(header))


def write_generated(path: Path, size: int, seed: str) -> None:
    """The same bytes as a seed's {"bytes": size, "seed": seed}, written in chunks."""
    with open(path, "wb") as out:
        for chunk in generated_chunks(size, seed):
            out.write(chunk)


def build_demo(src: Path, large_size: int = LARGE_DEFAULT) -> dict[str, Any]:
    """Write the demo's files under src and return a seed document that names them."""
    src.mkdir(parents=True, exist_ok=True)

    def put(name: str, data: bytes) -> dict[str, str]:
        (src / name).write_bytes(data)
        return {"file": name}

    turbines = ["WTG-001", "WTG-002", "WTG-003"]
    devices: list[dict[str, Any]] = []
    for i, asset in enumerate(turbines):
        event_db(src / f"{asset}-events.db", asset, 500 + 100 * i)
        attrs: dict[str, Any] = {
            "rated_power": 3000.0 + 500 * i,
            "model_file": {
                **put(f"{asset}-model.json", model_json(asset, 3000 + 500 * i)),
                "name": f"{asset.lower()}-model.json",
            },
            "nameplate_photo": {
                **put(f"{asset}.png", png(64 + 16 * i, 48)),
                "name": "nameplate.png",
            },
            "commissioning_docs": {
                **put(f"{asset}-docs.zip", docs_zip(asset)),
                "name": "commissioning.zip",
            },
        }
        mps: dict[str, Any] = {
            "wind_speed": 7.5 + i,
            "scada_export": {
                **put(f"{asset}-scada.csv", scada_csv(asset, 2000)),
                "name": f"scada-{asset.lower()}.csv",
            },
            "event_log": {"file": f"{asset}-events.db", "name": "events.db"},
        }
        if i == 2:
            attrs["blade_scan"] = {
                "bytes": LARK_SIZE,
                "seed": "blade-scan-" + asset,
                "name": "blade-scan.dat",
                "uri": LARK_URI,
            }
        if i == 0:
            attrs["maintenance_notes"] = {**put("empty.txt", b""), "name": "notes.txt"}
            write_generated(src / "vibration.bin", large_size, "vibration-" + asset)
            mps["vibration_raw"] = {"file": "vibration.bin", "name": "vibration-raw.bin"}
        devices.append(
            {
                "assetId": asset,
                "productKey": "pkTurbine",
                "deviceKey": asset.lower(),
                "name": f"Wind turbine {asset[-3:]}",
                "attributes": attrs,
                "measurepoints": mps,
            }
        )
    for i, asset in enumerate(["INV-101", "INV-102"]):
        devices.append(
            {
                "assetId": asset,
                "productKey": "pkInverter",
                "deviceKey": asset.lower(),
                "name": f"PV inverter {asset[-3:]}",
                "attributes": {
                    "datasheet": {
                        **put(f"{asset}-datasheet.json", model_json(asset, 250 + 10 * i)),
                        "name": "datasheet.json",
                    }
                },
                "measurepoints": {
                    "daily_yield": {
                        **put(f"{asset}-yield.csv", scada_csv(asset, 300)),
                        "name": "yield.csv",
                    }
                },
            }
        )
    firmwares = [
        {
            "productKey": "pkTurbine",
            "name": "turbine-controller",
            "version": "4.1.0",
            "signMethod": "md5",
            **put("tc-4.1.0.bin", firmware_image("tc-4.1.0", 3 * 1024**2 + 17)),
            "createTime": 1_700_000_100_000,
        },
        {
            "productKey": "pkTurbine",
            "name": "turbine-controller",
            "version": "4.2.1",
            "signMethod": "md5",
            **put("tc-4.2.1.bin", firmware_image("tc-4.2.1", 3 * 1024**2 + 913)),
            "createTime": 1_700_000_200_000,
        },
        {
            "productKey": "pkInverter",
            "name": "inverter-dsp",
            "version": "2.3.1",
            "signMethod": "sha256",
            **put("dsp-2.3.1.hex", firmware_image("dsp-2.3.1", 512 * 1024)),
            "createTime": 1_700_000_300_000,
        },
    ]
    return {
        "apps": [{"appKey": DEMO_APP_KEY, "appSecret": DEMO_APP_SECRET}],
        "orgs": [
            {
                "orgId": DEMO_ORG,
                "models": [
                    {
                        "modelId": "wind_turbine",
                        "name": "Wind turbine",
                        "attributes": {
                            "rated_power": "DOUBLE",
                            "model_file": "FILE",
                            "nameplate_photo": "FILE",
                            "commissioning_docs": "FILE",
                            "maintenance_notes": "FILE",
                            "blade_scan": "FILE",
                        },
                        "measurepoints": {
                            "wind_speed": "DOUBLE",
                            "scada_export": "FILE",
                            "event_log": "FILE",
                            "vibration_raw": "FILE",
                        },
                        "events": {"fault_snapshot": "FILE"},
                    },
                    {
                        "modelId": "pv_inverter",
                        "name": "PV inverter",
                        "attributes": {"datasheet": "FILE"},
                        "measurepoints": {"daily_yield": "FILE"},
                    },
                ],
                "products": [
                    {"productKey": "pkTurbine", "name": "Wind turbine", "modelId": "wind_turbine"},
                    {"productKey": "pkInverter", "name": "PV inverter", "modelId": "pv_inverter"},
                ],
                "devices": devices,
                "firmwares": firmwares,
            }
        ],
    }
