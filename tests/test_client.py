"""Layer 2: the client (token, envelopes, listings, downloads) against the emulator."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from enosfs.api import EnosClient, FileRef
from enosfs.auth import TokenSource
from enosfs.config import Secret
from enosfs.errors import AuthError, InvalidArgument, NotFound, ProtocolError, TransportError
from enosfs.jsonbody import MAX_JSON
from enosfs.mount import http_client, lean_transport
from enosfs.retry import RetryPolicy
from enosfs.signature import token_signature
from tests.support import Emulator, demo_files, emulator, free_port


@asynccontextmanager
async def client_for(
    emu: Emulator, secret: str | None = None, timeout: float = 10
) -> AsyncIterator[EnosClient]:
    """A client as a mount makes it: API calls and file bodies on one lean transport."""
    settings = emu.settings()
    policy = RetryPolicy(timeout=timeout)
    transport = lean_transport(settings)
    async with http_client(settings, transport) as http:
        tokens = TokenSource(
            http,
            settings.gateway,
            settings.app_key,
            Secret(secret or emu.app_secret),
            policy=policy,
        )
        await tokens.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tokens.run)
            yield EnosClient(
                http,
                tokens,
                gateway=settings.gateway,
                integration=settings.integration,
                policy=policy,
                lean=transport,
            )
            nursery.cancel_scope.cancel()


def small_seed(tmp: Path, devices: int = 3) -> Path:
    seed = {
        "apps": [{"appKey": "k1", "appSecret": "s1"}],
        "orgs": [
            {
                "orgId": "o1",
                "models": [
                    {
                        "modelId": "m1",
                        "attributes": {"doc": "FILE", "n": "INT"},
                        "measurepoints": {"snap": "FILE"},
                    }
                ],
                "products": [{"productKey": "p1", "modelId": "m1"}],
                "devices": [
                    {
                        "assetId": f"a{i:04d}",
                        "productKey": "p1",
                        "attributes": {"doc": {"text": f"doc of a{i:04d}\n", "name": "doc.txt"}}
                        if i < 3
                        else {"n": i},
                    }
                    for i in range(devices)
                ],
                "firmwares": [
                    {
                        "productKey": "p1",
                        "name": "fw",
                        "version": "1.0",
                        "bytes": 4096,
                        "seed": "fw",
                        "fileName": "fw.bin",
                    }
                ],
            }
        ],
    }
    path = tmp / "seed.json"
    path.write_text(json.dumps(seed))
    return path


@asynccontextmanager
async def small_emulator(tmp: Path, devices: int = 3, *extra: str) -> AsyncIterator[Emulator]:
    seed = small_seed(tmp, devices)
    with emulator(tmp / "data", str(seed), *extra) as emu:
        emu.app_key, emu.app_secret, emu.org = "k1", "s1", "o1"
        yield emu


def first_file(emu: Emulator) -> tuple[str, FileRef]:
    path, uri = next((p, u) for p, u in sorted(demo_files(emu).items()) if "/feature/" in p)
    return path, FileRef(emu.org, path.split("/")[0], "feature", uri)


async def test_token_then_device_search(emu: Emulator) -> None:
    async with client_for(emu) as client:
        devices = await client.search_devices(emu.org)
        assert sorted(d.asset_id for d in devices) == [
            "INV-101",
            "INV-102",
            "WTG-001",
            "WTG-002",
            "WTG-003",
        ]
        wtg = next(d for d in devices if d.asset_id == "WTG-001")
        assert wtg.model_id == "wind_turbine" and wtg.name == "Wind turbine 001"
        features = await client.get_file_features(emu.org, wtg.model_id)
        assert "model_file" in features.attributes and "rated_power" not in features.attributes
        assert "vibration_raw" in features.measurepoints
    stats = emu.stats()
    assert stats["token.get"] == 1 and stats["devices.search"] == 1


async def test_wrong_secret_is_a_clear_auth_error(emu: Emulator) -> None:
    with pytest.raises(AuthError) as info:
        async with client_for(emu, secret="wrong-secret"):
            pass
    text = str(info.value)
    assert "encryption" in text and "wrong-secret" not in text and emu.app_secret not in text


async def test_unknown_app_key(emu: Emulator) -> None:
    settings = emu.settings()
    async with http_client(settings) as http:
        tokens = TokenSource(http, settings.gateway, "no-such-app", Secret("x"))
        with pytest.raises(AuthError, match="appKey does not exist"):
            await tokens.start()


async def test_unreachable_gateway_fails_promptly() -> None:
    port = free_port()
    async with httpx.AsyncClient() as http:
        tokens = TokenSource(
            http, f"http://127.0.0.1:{port}", "k", Secret("s"), policy=RetryPolicy(timeout=2)
        )
        start = trio.current_time()
        with pytest.raises(TransportError):
            await tokens.start()
        assert trio.current_time() - start < 5


async def test_unknown_org_and_missing_file(emu: Emulator) -> None:
    async with client_for(emu) as client:
        with pytest.raises(InvalidArgument) as info:
            await client.search_devices_page("o-nope", 1)
        assert info.value.code == 99400 and info.value.request_id
        ref = FileRef(emu.org, "WTG-001", "feature", "enos-connect://0000000000000000.txt")
        with pytest.raises(NotFound):
            await client.file_meta(ref)
        with pytest.raises(NotFound):
            async with client.open_download(ref):
                pass


async def test_ranged_and_whole_downloads(emu: Emulator) -> None:
    _, ref = first_file(emu)
    want = emu.blob(ref.uri)
    async with client_for(emu) as client:
        meta = await client.file_meta(ref)
        assert meta.size == len(want) and meta.md5 == hashlib.md5(want).hexdigest()

        async def fetch(start: int, end: int | None) -> tuple[bytes, Any]:
            async with client.open_download(ref, start, end) as body:
                return b"".join([c async for c in body.chunks()]), body

        data, body = await fetch(10, 19)
        assert data == want[10:20] and body.ranged and body.total == len(want)
        data, body = await fetch(0, None)
        assert data == want
        data, body = await fetch(len(want), None)
        assert data == b"" and body.total == len(want)


async def test_server_without_range(emu: Emulator) -> None:
    _, ref = first_file(emu)
    want = emu.blob(ref.uri)
    emu.switches(honour_range=False)
    async with client_for(emu) as client, client.open_download(ref, 10, 19) as body:
        assert not body.ranged and body.start == 0
        assert b"".join([c async for c in body.chunks()]) == want


async def test_size_by_probe_when_getfileinfo_is_missing(emu: Emulator) -> None:
    _, ref = first_file(emu)
    emu.switches(file_info=False)
    async with client_for(emu) as client:
        meta = await client.file_meta(ref)
        assert meta.size == len(emu.blob(ref.uri)) and meta.md5 is None
        assert not client.file_info_supported
        await client.file_meta(ref)
    stats = emu.stats()
    assert stats["files.getFileInfo"] == 1  # learnt once, not asked again
    assert stats["files.download"] == 2 and stats["files.download.bytes"] <= 2


async def test_device_paging(tmp_path: Path) -> None:
    async with small_emulator(tmp_path, 450) as emu, client_for(emu) as client:
        devices = await client.search_devices("o1")
        assert len({d.asset_id for d in devices}) == 450
        assert emu.stats()["devices.search"] == 3


async def test_token_renewed_ahead_of_expiry(tmp_path: Path) -> None:
    async with small_emulator(tmp_path, 3, "--token-lifetime", "2") as emu:
        async with client_for(emu) as client:
            for _ in range(12):
                await client.get_device("o1", "a0000")
                await trio.sleep(0.4)
            assert client.tokens.refreshes >= 2
        stats = emu.stats()
        assert stats.get("auth.rejected", 0) == 0
        assert stats["token.refresh"] >= 2


async def test_rejected_token_is_renewed_once_for_all_waiters(emu: Emulator) -> None:
    async with client_for(emu) as client:
        await client.get_device(emu.org, "WTG-001")
        emu.admin("POST", "tokens/revoke")
        emu.reset_stats()
        results: list[str] = []

        async def one() -> None:
            results.append((await client.get_device(emu.org, "WTG-002")).asset_id)

        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
        assert results == ["WTG-002"] * 10
        assert client.tokens.refreshes == 1
    stats = emu.stats()
    assert stats["auth.rejected"] == 10
    assert stats.get("token.refresh", 0) + stats.get("token.get", 0) <= 2


async def test_upload_firmware_and_delete(tmp_path: Path) -> None:
    """The emulator's write APIs, as documented: multipart upload, OTA create, delete."""
    async with small_emulator(tmp_path) as emu, client_for(emu) as client:
        token = await client.tokens.get()
        payload = b"new manual\n" * 1000
        message = {
            "id": "1",
            "version": "1.1",
            "method": "integration.attribute.post",
            "params": [{"assetId": "a0001", "attributes": {"doc": "local://m.txt"}}],
            "files": {
                "m.txt": {
                    "featureId": "doc",
                    "assetId": "a0001",
                    "md5": hashlib.md5(payload).hexdigest(),
                    "originalFilename": "manual.txt",
                }
            },
        }
        r = await client.http.post(
            f"{emu.url}/connect-service/v2.1/integration",
            params={"action": "postAttribute", "orgId": "o1"},
            headers={"apim-accesstoken": token},
            files=[
                ("enos-message", (None, json.dumps(message))),
                ("enos-file", ("m.txt", payload, "application/octet-stream")),
            ],
        )
        assert r.json()["code"] == 0, r.text
        uri = (await client.get_device("o1", "a0001")).attributes["doc"]
        assert uri.startswith("enos-connect://") and uri.endswith(".txt")
        ref = FileRef("o1", "a0001", "feature", uri)
        meta = await client.file_meta(ref)
        assert meta.size == len(payload) and meta.original_name == "manual.txt"

        fw = b"\x7fELF" + bytes(range(256)) * 64
        r = await client.http.post(
            f"{emu.url}/connect-service/v2.1/ota-firmwares",
            params={"action": "create", "orgId": "o1", "productKey": "p1"},
            headers={"apim-accesstoken": token},
            files=[
                (
                    "metadata",
                    (
                        None,
                        json.dumps(
                            {
                                "name": {"defaultValue": "fw2"},
                                "version": "2.0",
                                "signMethod": "sha256",
                                "sign": hashlib.sha256(fw).hexdigest(),
                                "enableVerification": False,
                            }
                        ),
                    ),
                ),
                ("file", ("fw2.bin", fw, "application/octet-stream")),
            ],
        )
        assert r.json()["code"] == 0, r.text
        firmwares = await client.search_firmwares("o1", "p1")
        assert {(f.name, f.version) for f in firmwares} == {("fw", "1.0"), ("fw2", "2.0")}
        fw2 = next(f for f in firmwares if f.name == "fw2")
        assert fw2.size == len(fw) and fw2.sign == hashlib.sha256(fw).hexdigest()

        r = await client.http.post(
            f"{emu.url}/connect-service/v2.1/files",
            params={"action": "delete", **ref.params()},
            headers={"apim-accesstoken": token},
        )
        assert r.json()["code"] == 0
        with pytest.raises(NotFound):
            await client.file_meta(ref)


async def test_a_huge_json_answer_is_refused_at_the_cap(emu: Emulator) -> None:
    """A listing answer padded past MAX_JSON (valid JSON all the same) is a one-line
    ProtocolError, read no further than the cap, not a parse of everything."""
    async with client_for(emu) as client:
        emu.faults({"kind": "bloat", "match": "devices.search", "size": MAX_JSON + 4 * 1024**2})
        with pytest.raises(ProtocolError) as info:
            await client.search_devices_page(emu.org, 1)
        assert "larger than 16 MiB" in str(info.value) and "\n" not in str(info.value)
        assert emu.fired() == {"bloat": 1}, "a refused answer is not asked for again"
        emu.admin("DELETE", "faults")
        devices, _ = await client.search_devices_page(emu.org, 1)
        assert devices


async def test_a_huge_token_answer_is_refused_at_the_cap(emu: Emulator) -> None:
    emu.faults({"kind": "bloat", "match": "token.*", "size": MAX_JSON + 1})
    with pytest.raises(ProtocolError, match="larger than 16 MiB"):
        async with client_for(emu):
            pass


# -- the emulator's manners --------------------------------------------------------------


async def test_the_admin_api_answers_loopback_clients_only(demo_emu: Emulator) -> None:
    """A real client off loopback cannot be had here (tests talk to loopback only), so
    the peer address is set through httpx's ASGI transport."""
    from enosfs.emulator.app import Emulator as App
    from enosfs.emulator.server import admin_warning
    from enosfs.emulator.state import State

    state = State.load(demo_emu.data_dir)
    for peer, expose, status in [
        ("192.0.2.7", False, 403),
        ("127.0.0.1", False, 200),
        ("::1", False, 200),
        ("::ffff:127.0.0.1", False, 200),
        ("192.0.2.7", True, 200),
    ]:
        app = App(state, expose_admin=expose).app()
        transport = httpx.ASGITransport(app=app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://emu") as http:
            assert (await http.get("/__emulator__/tokens")).status_code == status, peer
            assert (await http.post("/__emulator__/tokens/revoke")).status_code == status
            # The EnOS APIs themselves answer anyone.
            r = await http.post("/apim-token-service/v2.0/token/get", json={})
            assert r.status_code == 200 and r.json()["status"] == 1202
    assert admin_warning("127.0.0.1", False) is None and admin_warning("::1", False) is None
    assert "answers loopback clients only" in str(admin_warning("0.0.0.0", False))
    assert "open to anyone" in str(admin_warning("0.0.0.0", True))


def test_sigterm_stops_the_emulator_promptly_and_removes_its_temp_data(tmp_path: Path) -> None:
    """A download held by a stall must not hold up shutdown, and the temporary data
    folder (no --data-dir) must not be left behind."""
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "enosfs",
            "emulator",
            "--seed",
            str(small_seed(tmp_path)),
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--fault",
            "stall:seconds=120,match=files.download",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    data_dir: Path | None = None
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "emulator did not start"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        url, data_dir = info["url"], Path(info["data_dir"])
        assert data_dir.is_dir()
        ts = int(time.time() * 1000)
        token = httpx.post(
            f"{url}/apim-token-service/v2.0/token/get",
            json={"appKey": "k1", "encryption": token_signature("k1", ts, "s1"), "timestamp": ts},
            timeout=10,
        ).json()["data"]["accessToken"]
        state = json.loads((data_dir / "state.json").read_text())
        blob = next(b for b in state["blobs"] if b["category"] == "ota")
        params = {
            "action": "download",
            "orgId": "o1",
            "assetId": "a0000",
            "category": "ota",
            "fileUri": blob["uri"],
        }

        def stalls() -> int:
            stats = httpx.get(f"{url}/__emulator__/stats", timeout=10).json()["requests"]
            return int(stats.get("faults.stall", 0))

        def download() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(
                    f"{url}/connect-service/v2.1/files",
                    params=params,
                    headers={"apim-accesstoken": token},
                    timeout=30,
                )

        thread = threading.Thread(target=download, daemon=True)
        thread.start()
        while stalls() < 1:
            assert time.monotonic() < deadline, "the download never stalled"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            raise AssertionError("the emulator did not stop within 5 s of SIGTERM") from None
        thread.join(timeout=30)
        assert not data_dir.exists(), "the temporary data folder was left behind"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if data_dir is not None:
            shutil.rmtree(data_dir, ignore_errors=True)
