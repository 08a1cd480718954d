"""The emulator as a big organisation far away: generated seeds, the network profile,
the gateway's rate limit. Over loopback HTTP, no mount: these are the emulator's own
promises, which the client and bench tests then lean on."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from enosfs.emulator.content import GeneratedContent
from enosfs.emulator.generate import GenerateSpec, parse_spec
from enosfs.emulator.network import NetworkProfile
from enosfs.emulator.pacing import Pacer
from enosfs.emulator.ratelimit import RateLimit
from enosfs.emulator.state import SeedError
from enosfs.signature import token_signature
from tests.support import Emulator, emulator, enosfs

BIG = "generate:devices=5000,models=1,products=5,attrs=2,points=1,firmware=1"
SMALL = "generate:devices=30,models=2,products=3,attrs=3,points=2,firmware=2,seed=7"


class Api:
    """Plain HTTP calls with a token, as the gateway sees them: one keep-alive connection."""

    def __init__(self, emu: Emulator, app_key: str | None = None, secret: str | None = None):
        self.emu = emu
        self.http = httpx.Client(base_url=emu.url, timeout=30)
        key, secret = app_key or emu.app_key, secret or emu.app_secret
        ts = str(int(time.time() * 1000))
        r = self.http.post(
            "/apim-token-service/v2.0/token/get",
            json={"appKey": key, "encryption": token_signature(key, ts, secret), "timestamp": ts},
        )
        self.token = r.json()["data"]["accessToken"]

    def call(self, method: str, path: str, body: Any = None, **params: str) -> httpx.Response:
        return self.http.request(
            method,
            path,
            params={"orgId": self.emu.org, **params},
            json=body,
            headers={"apim-accesstoken": self.token},
        )

    def ok(self, method: str, path: str, body: Any = None, **params: str) -> Any:
        r = self.call(method, path, body, **params)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["code"] == 0, doc
        return doc

    def devices(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            doc = self.ok(
                "POST",
                "/connect-service/v2.1/devices",
                {"pagination": {"pageNo": page, "pageSize": 200}},
                action="search",
            )
            out += doc["data"]
            if len(out) >= doc["pagination"]["totalSize"]:
                return out
            page += 1

    def firmwares(self) -> list[dict[str, Any]]:
        doc = self.ok(
            "POST",
            "/connect-service/v2.1/ota-firmwares",
            {"pagination": {"pageNo": 1, "pageSize": 100}},
            action="search",
        )
        return list(doc["data"])

    def download(self, asset: str, uri: str, category: str = "feature", **headers: str) -> bytes:
        r = self.http.get(
            "/connect-service/v2.1/files",
            params={
                "action": "download",
                "orgId": self.emu.org,
                "assetId": asset,
                "fileUri": uri,
                "category": category,
            },
            headers={"apim-accesstoken": self.token, **headers},
        )
        assert r.status_code in (200, 206), r.text
        return r.content

    def file_info(self, asset: str, uri: str, category: str = "feature") -> dict[str, Any]:
        doc = self.ok(
            "GET",
            "/connect-service/v2.1/files",
            action="getFileInfo",
            assetId=asset,
            fileUri=uri,
            category=category,
        )
        return dict(doc["data"])

    def close(self) -> None:
        self.http.close()


@contextmanager
def api(emu: Emulator, app_key: str | None = None, secret: str | None = None) -> Iterator[Api]:
    a = Api(emu, app_key, secret)
    try:
        yield a
    finally:
        a.close()


# -- generated seeds ---------------------------------------------------------------------


def test_generated_seed_has_the_shape_asked_for(tmp_path: Path) -> None:
    """Issue 10's organisation: 5,000 devices in 25 search pages, each with two FILE
    attributes and one FILE measurement point, five products with firmware."""
    with emulator(tmp_path / "data", BIG) as emu, api(emu) as a:
        devices = a.devices()
        stats = emu.stats()
        assert stats["devices.search"] == 25
        assert len(devices) == 5000
        assert len({d["assetId"] for d in devices}) == 5000
        assert len({d["productKey"] for d in devices}) == 5
        model = a.ok(
            "GET",
            "/model-service/v2.1/thing-models",
            action="get",
            modelId=devices[0]["modelId"],
        )["data"]
        file_attrs = [k for k, v in model["attributes"].items() if v["dataType"] == "FILE"]
        file_points = [k for k, v in model["measurepoints"].items() if v["dataType"] == "FILE"]
        assert len(file_attrs) == 2 and len(file_points) == 1
        first = devices[-1]  # the first created: search answers newest first
        for ident in file_attrs:
            assert first["deviceAttributes"][ident].startswith("enos-connect://")
        latest = a.ok(
            "POST",
            "/connect-service/v2.1/measurepoints",
            {},
            action="queryLatest",
            assetId=first["assetId"],
        )["data"]
        point = next(p for p in latest if p["id"] == file_points[0])
        assert point["value"].startswith("enos-connect://")
        firmwares = a.firmwares()
        assert len(firmwares) == 5
        assert {f["productKey"] for f in firmwares} == {d["productKey"] for d in devices}
        # A file whose bytes were never stored: its info and its bytes agree.
        info = a.file_info(first["assetId"], point["value"])
        body = a.download(first["assetId"], point["value"])
        assert len(body) == info["fileSize"] > 0
        assert hashlib.md5(body).hexdigest() == info["md5"]
        assert body == emu.blob(point["value"])
        # Nothing of the sort was written to disk.
        assert not any((emu.data_dir / "blobs").iterdir())


def _snapshot(emu: Emulator) -> dict[str, Any]:
    with api(emu) as a:
        devices = a.devices()
        firmwares = a.firmwares()
        asset = devices[0]["assetId"]
        uri = next(v for v in devices[0]["deviceAttributes"].values() if isinstance(v, str))
        fw = firmwares[-1]
        return {
            "devices": [(d["assetId"], d["deviceKey"], d["deviceAttributes"]) for d in devices],
            "firmwares": [
                (f["firmwareId"], f["fileUrl"], f["fileSize"], f["sign"]) for f in firmwares
            ],
            "info": a.file_info(asset, uri),
            "range": a.download(asset, uri, range="bytes=1000-70999"),
            "firmware": a.download(asset, fw["fileUrl"], "ota"),
        }


def test_generated_seed_is_deterministic(tmp_path: Path) -> None:
    """Two emulators from the same spec serve the same ids, names, sizes and bytes; a
    firmware's sign (md5 or sha256) is that of the bytes served."""
    with emulator(tmp_path / "one", SMALL) as one, emulator(tmp_path / "two", SMALL) as two:
        a, b = _snapshot(one), _snapshot(two)
    assert a == b
    assert len(a["devices"]) == 30
    assert len(a["firmwares"]) == 3 * 2
    fw = a["firmwares"][-1]
    assert len(a["firmware"]) == fw[2]
    signs = {hashlib.md5(a["firmware"]).hexdigest(), hashlib.sha256(a["firmware"]).hexdigest()}
    assert fw[3] in signs
    assert {len(f[3]) for f in a["firmwares"]} == {32, 64}  # both sign methods appear
    assert len(a["range"]) == 70000


def test_generated_content_is_random_access() -> None:
    content = GeneratedContent("s", 300_000)
    whole = content.all_bytes()
    assert len(whole) == 300_000
    assert content.read(65_000, 2_000) == whole[65_000:67_000]  # across a block edge
    assert content.read(299_990, 100) == whole[299_990:]
    assert content.read(300_000, 10) == b""
    assert content.digests() == (hashlib.md5(whole).hexdigest(),) * 2
    assert content.digests("sha256")[1] == hashlib.sha256(whole).hexdigest()
    assert GeneratedContent("t", 300_000).all_bytes() != whole


def test_spec_defaults_and_errors() -> None:
    spec = parse_spec("generate:devices=5000,products=5,file_max=1MiB")
    assert spec == GenerateSpec(devices=5000, products=5, file_max=1024 * 1024)
    assert parse_spec("generate:") == GenerateSpec()
    for bad, says in (
        ("generate:colour=blue", "unknown key 'colour'"),
        ("generate:devices=many", "devices takes a whole number"),
        ("generate:devices", "is not key=value"),
        ("generate:devices=-3", "must not be negative"),
        ("generate:models=0", "models must be at least 1"),
        ("generate:file_min=2MiB,file_max=1MiB", "_min must not be above"),
        ("generate:file_max=lots", "file_max must be a size"),
    ):
        with pytest.raises(SeedError, match=says):
            parse_spec(bad)


@pytest.mark.parametrize(
    "args",
    [
        ["--seed", "generate:devices=lots"],
        ["--seed", "generate:devices=3", "--network", "rtt=40ms,speed=fast"],
        ["--seed", "generate:devices=3", "--rate-limit", "50/fortnight"],
    ],
)
def test_bad_switches_are_refused_in_one_line(tmp_path: Path, args: list[str]) -> None:
    out = enosfs("emulator", "--port", "0", "--data-dir", str(tmp_path / "d"), *args, timeout=60)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("enosfs"), out.stderr
    assert "Traceback" not in out.stderr


# -- the network profile -----------------------------------------------------------------


def test_network_spec() -> None:
    p = NetworkProfile.from_spec("rtt=40ms,conn=25MB/s,link=125MB/s")
    assert (p.rtt, p.connect, p.conn, p.link) == (0.04, 0.04, 25e6, 125e6)
    assert NetworkProfile.from_spec("rtt=40ms,connect=0").connect == 0
    assert NetworkProfile.from_spec("") == NetworkProfile()


def test_pacer_keeps_to_its_rate() -> None:
    """A lone sender goes at once, then one chunk's time per chunk; two senders on one
    pacer share it."""
    pacer = Pacer(1000.0, 100)
    assert pacer.reserve(100, now=0.0) == 0.0
    assert pacer.reserve(100, now=0.0) == pytest.approx(0.1)
    assert pacer.reserve(100, now=0.0) == pytest.approx(0.2)
    assert pacer.reserve(100, now=10.0) == 0.0  # idle time is not saved up beyond a burst


def test_rtt_and_connect_cost_are_paid(tmp_path: Path) -> None:
    """Lower bounds only: each API request takes at least the round trip, a new
    connection at least its connect cost more; the admin API is not slowed."""
    with emulator(tmp_path / "data", SMALL, "--network", "rtt=50ms,connect=100ms") as emu:
        before = emu.stats().get("connections", 0)
        with api(emu) as a:  # one connection: the token request pays its cost
            start = time.monotonic()
            for _ in range(10):
                a.ok("GET", "/model-service/v2.1/thing-models", action="get", modelId="gen_model_1")
            assert time.monotonic() - start >= 0.45
        with httpx.Client(base_url=emu.url) as fresh:
            start = time.monotonic()
            fresh.post("/apim-token-service/v2.0/token/get", json={})
            assert time.monotonic() - start >= 0.14  # connect + rtt, less timer slack
        assert emu.stats()["connections"] - before >= 2
        assert emu.network()["network"]["rtt"] == 0.05


def test_network_caps_bandwidth_per_body_and_per_link(tmp_path: Path) -> None:
    """At 2 MB/s a 512 KiB range takes at least a fifth of a second; two at once on a
    2 MB/s link take twice as long as one."""
    with emulator(tmp_path / "data", SMALL) as emu, api(emu) as a:
        device = a.devices()[0]
        asset = device["assetId"]
        uri = next(v for v in device["deviceAttributes"].values() if isinstance(v, str))
        fw = a.firmwares()[0]["fileUrl"]  # firmware: at least 2 MiB
        want = "bytes=0-524287"
        emu.network(network="conn=2MB/s")
        start = time.monotonic()
        assert len(a.download(asset, fw, "ota", range=want)) == 524288
        assert time.monotonic() - start >= 0.2
        emu.network(network="link=2MB/s")
        bodies: list[int] = []

        def fetch() -> None:
            with api(emu) as b:
                bodies.append(len(b.download(asset, fw, "ota", range=want)))

        start = time.monotonic()
        threads = [threading.Thread(target=fetch) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bodies == [524288, 524288]
        assert time.monotonic() - start >= 0.45
        emu.network(network="")
        assert a.download(asset, uri) == emu.blob(uri)


# -- the rate limit ----------------------------------------------------------------------


def test_rate_limit_answers_429_then_serves_again(tmp_path: Path) -> None:
    with emulator(tmp_path / "data", SMALL, "--rate-limit", "5/s") as emu, api(emu) as a:
        emu.admin("POST", "apps", {"appKey": "other-app", "appSecret": "other-secret"})
        emu.reset_stats()
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def one() -> None:
            with httpx.Client(base_url=emu.url, timeout=30) as http:
                r = http.get(
                    "/model-service/v2.1/thing-models",
                    params={"orgId": emu.org, "action": "get", "modelId": "gen_model_1"},
                    headers={"apim-accesstoken": a.token},
                )
            with lock:
                answers.append(r)

        threads = [threading.Thread(target=one) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [r for r in answers if r.status_code == 429]
        served = [r for r in answers if r.status_code == 200]
        assert len(refused) + len(served) == 20
        assert refused and len(served) >= 5
        doc = refused[0].json()
        assert doc["code"] == 99429 and "rate limit" in doc["msg"]
        wait = int(refused[-1].headers["retry-after"])
        assert wait >= 1
        stats = emu.stats()
        assert stats["ratelimit.429"] == len(refused)
        # A refused call came after 5 admitted in its second: the gateway saw 6 then.
        assert emu.admin("GET", "stats")["rate_limit"]["peak_seen"] >= 6
        assert stats["thing-models.get"] == 20
        # Another app has its own allowance, at once.
        with api(emu, "other-app", "other-secret") as other:
            other.ok("GET", "/model-service/v2.1/thing-models", action="get", modelId="gen_model_1")
        time.sleep(wait)
        a.ok("GET", "/model-service/v2.1/thing-models", action="get", modelId="gen_model_1")


def test_rate_limit_window_slides() -> None:
    limit = RateLimit.from_spec("2/s")
    assert limit.admit("a", now=0.0) is None
    assert limit.admit("a", now=0.5) is None
    assert limit.admit("a", now=0.9) == pytest.approx(0.1)
    assert limit.admit("b", now=0.9) is None
    assert limit.admit("a", now=1.0) is None
    assert RateLimit.from_spec("120/min").window == 60.0
    # What the gateway saw in its busiest second, refused calls included, per app.
    assert limit.peak_seen == 3  # a's calls at 0.5, 0.9 and 1.0
    limit.reset_peak()
    assert limit.peak_seen == 0
