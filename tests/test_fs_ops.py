"""Layer 4: fs.Operations called directly, without the kernel, against the emulator."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from enosfs.blocks import BlockCache
from enosfs.changes import Changes
from enosfs.fs import EnosFS
from enosfs.namespace import ROOT_INODE, Dir, File, Namespace
from enosfs.views import VIEW_NAMES
from tests.support import Emulator, demo_files, emulator
from tests.test_client import client_for


@asynccontextmanager
async def ops_for(emu: Emulator, **settings: Any) -> AsyncIterator[EnosFS]:
    s = emu.settings(**settings)
    async with client_for(emu) as client, trio.open_nursery() as nursery:
        cache = BlockCache(client, nursery, block_size=s.block_size, budget=s.cache_memory)
        yield EnosFS(Namespace(client, s), cache, s)
        nursery.cancel_scope.cancel()


async def walk(ops: EnosFS, path: str) -> pyfuse3.EntryAttributes:
    inode = ROOT_INODE
    attrs = await ops.getattr(inode)
    for part in path.strip("/").split("/"):
        attrs = await ops.lookup(inode, part.encode())
        inode = attrs.st_ino
    return attrs


async def listing(ops: EnosFS, inode: int) -> list[str]:
    fh = await ops.opendir(inode, None)
    try:
        return [name.decode() for name, _ in ops.dir_handles[fh]]
    finally:
        await ops.releasedir(fh)


def fuse_errno(exc: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return exc.value.errno


async def assert_missing(ops: EnosFS, parent: int, name: bytes) -> None:
    """ENOENT as a negative entry (inode 0) the kernel may keep for negative_ttl."""
    attrs = await ops.lookup(parent, name)
    assert attrs.st_ino == 0, name
    assert attrs.entry_timeout == ops.settings.negative_ttl


async def test_tree_sizes_and_bytes(emu: Emulator) -> None:
    files = demo_files(emu)
    blobs = emu.blobs()
    async with ops_for(emu) as ops:
        assert await listing(ops, ROOT_INODE) == [emu.org]
        org = await walk(ops, emu.org)
        assert await listing(ops, org.st_ino) == [
            "INV-101",
            "INV-102",
            "WTG-001",
            "WTG-002",
            "WTG-003",
            "by-key",
            "by-name",
        ]
        link = await walk(ops, f"{emu.org}/by-key/pkTurbine/wtg-002")
        assert stat.S_ISLNK(link.st_mode) and link.st_size == len("../../WTG-002")
        assert await ops.readlink(link.st_ino, None) == b"../../WTG-002"
        for rel, uri in sorted(files.items()):
            attrs = await walk(ops, f"{emu.org}/{rel}")
            assert attrs.st_size == blobs[uri]["size"], rel
            assert attrs.st_mode & 0o777 == 0o444
        emu.reset_stats()
        attrs = await walk(ops, f"{emu.org}/WTG-002/feature/model_file.json")
        fi = await ops.open(attrs.st_ino, os.O_RDONLY, None)
        data = await ops.read(fi.fh, 0, attrs.st_size + 100)
        assert (
            hashlib.md5(data).hexdigest() == blobs[files["WTG-002/feature/model_file.json"]]["md5"]
        )
        assert await ops.read(fi.fh, attrs.st_size, 10) == b""
        await ops.release(fi.fh)
        assert emu.stats().get("files.getFileInfo", 0) == 0  # metadata came with the listing


async def test_missing_names_and_write_calls(emu: Emulator) -> None:
    async with ops_for(emu) as ops:
        feature = await walk(ops, f"{emu.org}/WTG-001/feature")
        for name in (b"nope.txt", b"...", b"\xff\xfe", b"0000000000000000.txt"):
            await assert_missing(ops, feature.st_ino, name)
        assert ops.errors["ENOENT"] == 4
        attrs = await walk(ops, f"{emu.org}/WTG-001/feature/model_file.json")
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await ops.open(attrs.st_ino, flags, None)
            assert fuse_errno(info) == errno.EROFS
        for call in (
            ops.mkdir,
            ops.unlink,
            ops.rmdir,
            ops.create,
            ops.rename,
            ops.setattr,
            ops.setxattr,
            ops.write,
            ops.symlink,
            ops.link,
            ops.mknod,
        ):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await call(feature.st_ino, b"x")
            assert fuse_errno(info) == errno.EROFS


async def test_file_reachable_by_uri_id(emu: Emulator) -> None:
    files = demo_files(emu)
    uri = files["WTG-003/feature/scada_export.csv"]
    file_id = uri.split("://", 1)[1]
    async with ops_for(emu) as ops:
        listed = await walk(ops, f"{emu.org}/WTG-003/feature/scada_export.csv")
        by_id = await walk(ops, f"{emu.org}/WTG-003/feature/{file_id}")
        assert by_id.st_ino == listed.st_ino
        # A file another listing does not show: reachable where its id is named.
        other = files["WTG-001/feature/event_log.db"].split("://", 1)[1]
        hidden = await walk(ops, f"{emu.org}/WTG-001/feature/{other}")
        assert hidden.st_size == emu.blobs()[files["WTG-001/feature/event_log.db"]]["size"]
        feature = await walk(ops, f"{emu.org}/WTG-001/feature")
        assert other not in await listing(ops, feature.st_ino)


async def test_unlisted_asset_is_reachable_by_id(emu: Emulator) -> None:
    async with ops_for(emu, org=[{"id": emu.org, "discover": False}]) as ops:
        org = await walk(ops, emu.org)
        assert await listing(ops, org.st_ino) == []
        attrs = await walk(ops, f"{emu.org}/INV-101/feature/datasheet.json")
        assert attrs.st_size > 0
        await assert_missing(ops, org.st_ino, b"NO-SUCH-ASSET")


async def test_configured_files_are_shown(emu: Emulator) -> None:
    uri = demo_files(emu)["INV-102/feature/daily_yield.csv"]
    extra = [
        {
            "org": emu.org,
            "asset": "INV-102",
            "category": "feature",
            "uri": uri,
            "name": "yield-from-config.csv",
        }
    ]
    async with ops_for(emu, file=extra) as ops:
        a = await walk(ops, f"{emu.org}/INV-102/feature/yield-from-config.csv")
        b = await walk(ops, f"{emu.org}/INV-102/feature/daily_yield.csv")
        assert a.st_size == b.st_size and a.st_ino != b.st_ino


async def test_xattrs_say_where_a_file_came_from(emu: Emulator) -> None:
    files = demo_files(emu)
    blobs = emu.blobs()
    async with ops_for(emu) as ops:
        fw = next(p for p in files if p.startswith("INV-101/ota/"))
        attrs = await walk(ops, f"{emu.org}/{fw}")
        names = await ops.listxattr(attrs.st_ino, None)
        assert b"user.enos.uri" in names and b"user.enos.sign_method" in names
        get = ops.getxattr
        assert await get(attrs.st_ino, b"user.enos.uri", None) == files[fw].encode()
        assert await get(attrs.st_ino, b"user.enos.sign_method", None) == b"sha256"
        assert await get(attrs.st_ino, b"user.enos.sign", None) == blobs[files[fw]]["sign"].encode()
        with pytest.raises(pyfuse3.FUSEError) as info:
            await get(attrs.st_ino, b"user.enos.nothing", None)
        assert fuse_errno(info) == pyfuse3.ENOATTR


async def test_statfs(emu: Emulator) -> None:
    async with ops_for(emu) as ops:
        await walk(ops, f"{emu.org}/WTG-001/feature/model_file.json")
        s = await ops.statfs(None)
        assert s.f_namemax == 255 and s.f_blocks > 0 and s.f_bavail == 0


@pytest.mark.allow_warnings(r"unexpected error \(answered EIO\)")
async def test_a_bug_in_a_handler_is_eio_not_a_crash(
    emu: Emulator, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with ops_for(emu) as ops:

        async def broken(*_: object) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(ops.ns, "children", broken)
        with pytest.raises(pyfuse3.FUSEError) as info:
            await ops.lookup(ROOT_INODE, emu.org.encode())
        assert fuse_errno(info) == errno.EIO
        assert "unexpected error" in caplog.text and "boom" in caplog.text


@pytest.mark.allow_warnings(r"the file changed")
async def test_a_change_seen_by_a_download_drops_the_old_version_everywhere(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A download finds the ETag moved -> the metadata is asked again -> the old
    version's blocks and the kernel's pages go: one path, through fs.changes."""
    told: list[tuple[str, object]] = []

    class Told(Changes):
        def drop_pages(self, inode: int) -> None:  # no kernel here to tell
            told.append(("pages", inode))

    with emulator(tmp_path_factory.mktemp("change-data"), "demo", "--demo-large-size", "8MiB") as e:
        rel = "WTG-001/feature/vibration_raw.bin"
        s = e.settings()
        async with client_for(e) as client, trio.open_nursery() as nursery:
            cache = BlockCache(client, nursery, block_size=1 << 20, budget=s.cache_memory)
            ns = Namespace(client, s)
            changes = Told(nursery)
            changes.attach(cache, ns)
            ops = EnosFS(ns, cache, s, changes)
            attrs = await walk(ops, f"{e.org}/{rel}")
            info = await ops.open(attrs.st_ino, os.O_RDONLY, None)
            old = e.blob(demo_files(e)[rel])
            # Not from the start: a sequential reader's blocks leave the cache as read.
            assert bytes(await ops.read(info.fh, 2 << 20, 4096)) == old[2 << 20 : (2 << 20) + 4096]
            with trio.fail_after(10):
                while not cache.lru:  # the block lands whole a moment after its first bytes
                    await trio.sleep(0.01)
            e.replace_feature("WTG-001", "vibration_raw", bytes=len(old), seed="v2", keep_uri=True)
            with pytest.raises(pyfuse3.FUSEError) as err:
                await ops.read(info.fh, 6 << 20, 4096)
            assert fuse_errno(err) == errno.ESTALE
            assert changes.counts["content"] == 1 and changes.counts["version"] == 0
            # The next open asks for the metadata again: the old version's blocks go,
            # and so do the kernel's pages of the file.
            await ops.release(info.fh)
            info = await ops.open(attrs.st_ino, os.O_RDONLY, None)
            assert changes.counts["version"] == 1
            assert ("pages", attrs.st_ino) in told
            assert len(cache.lru) == 0
            new = e.blob(demo_files(e)[rel])
            assert bytes(await ops.read(info.fh, 6 << 20, 4096)) == new[6 << 20 : (6 << 20) + 4096]
            await ops.release(info.fh)
            nursery.cancel_scope.cancel()


async def test_a_listing_asks_no_size_and_lets_the_kernel_keep_none(emu: Emulator) -> None:
    files = demo_files(emu)
    blobs = emu.blobs()
    async with ops_for(emu) as ops:
        emu.reset_stats()
        feature = await walk(ops, f"{emu.org}/WTG-001/feature")
        fh = await ops.opendir(feature.st_ino, None)
        entries = ops.dir_handles[fh]
        await ops.releasedir(fh)
        assert entries and emu.stats().get("files.getFileInfo", 0) == 0
        for _, node in entries:
            # What readdirplus hands the kernel: the name to keep, the 0 not.
            a = ops._attrs(node)
            assert (a.st_size, a.attr_timeout) == (0, 0)
            assert a.entry_timeout == ops.settings.entry_timeout
        got = await ops.getattr(entries[-1][1].inode)
        assert got.st_size == blobs[files[f"WTG-001/feature/{entries[-1][0].decode()}"]]["size"]
        assert emu.stats()["files.getFileInfo"] == len(entries)  # the folder, at once
        for name, node in entries:
            a = ops._attrs(node)
            assert a.st_size == blobs[files[f"WTG-001/feature/{name.decode()}"]]["size"]
            assert a.attr_timeout == ops.settings.attr_timeout


async def visit_asset(ops: EnosFS, org: int, name: str) -> None:
    """What `find` does in an asset folder: list it, then each category."""
    asset = await ops.lookup(org, name.encode())
    for category in await listing(ops, asset.st_ino):
        await listing(ops, (await ops.lookup(asset.st_ino, category.encode())).st_ino)


async def test_a_walk_in_order_lists_the_next_assets_ahead(emu: Emulator) -> None:
    async with ops_for(emu) as ops:
        org = await walk(ops, emu.org)
        assets = [n for n in await listing(ops, org.st_ino) if n not in VIEW_NAMES]
        emu.reset_stats()
        for name in assets[:2]:
            await visit_asset(ops, org.st_ino, name)
        # Every asset of the demo has a FILE measurement point: one queryLatest each.
        with trio.fail_after(30):
            while emu.stats().get("measurepoints.queryLatest", 0) < len(assets):
                await trio.sleep(0.02)
        emu.reset_stats()
        for name in assets[2:]:
            await visit_asset(ops, org.st_ino, name)
        assert emu.stats().get("measurepoints.queryLatest", 0) == 0


async def test_a_visit_out_of_order_lists_no_other_asset(emu: Emulator) -> None:
    async with ops_for(emu) as ops:
        org = await walk(ops, emu.org)
        assets = [n for n in await listing(ops, org.st_ino) if n not in VIEW_NAMES]
        emu.reset_stats()
        for name in (assets[3], assets[1]):
            await visit_asset(ops, org.st_ino, name)
        await trio.sleep(0.5)  # time for anything started ahead to show
        assert emu.stats().get("measurepoints.queryLatest", 0) == 2


async def test_a_listed_folder_opens_without_a_call_and_requests_are_counted(
    emu: Emulator,
) -> None:
    """opendir of a folder listed within the TTL answers from the listing (a walk finds
    most folders so); one past it lists again. Every request is counted by kind."""
    async with ops_for(emu) as ops:
        org = await walk(ops, emu.org)
        first = await listing(ops, org.st_ino)
        emu.reset_stats()
        assert await listing(ops, org.st_ino) == first
        assert emu.stats().get("devices.search", 0) == 0
        folder = ops.ns.get(org.st_ino)
        assert isinstance(folder, Dir) and ops.ns.listed(folder) is not None
        folder.loaded_at = float("-inf")
        assert ops.ns.listed(folder) is None
        assert await listing(ops, org.st_ino) == first
        assert emu.stats().get("devices.search", 0) >= 1
        kernel = ops.stats()["kernel"]["ops"]
        assert kernel["opendir"] == kernel["releasedir"] == 3
        assert kernel["lookup"] == 1 and kernel["getattr"] == 1


async def test_a_folder_read_file_after_file_gets_its_next_files_as_their_sizes_come(
    tmp_path: Path,
) -> None:
    """`cp -r` of a folder not sized yet: the files the read-ahead reaches before their
    sizes are known are fetched when the sizes come, not passed by (each would then cost
    the reader a round trip of its own)."""
    names = [f"f{i:02d}" for i in range(12)]
    seed = {
        "apps": [{"appKey": "k1", "appSecret": "s1"}],
        "orgs": [
            {
                "orgId": "o1",
                "models": [{"modelId": "m", "attributes": dict.fromkeys(names, "FILE")}],
                "products": [{"productKey": "p", "modelId": "m"}],
                "devices": [
                    {
                        "assetId": "A",
                        "productKey": "p",
                        "attributes": {
                            n: {"bytes": 65536, "seed": n, "name": f"{n}.bin"} for n in names
                        },
                    }
                ],
            }
        ],
    }
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    with emulator(tmp_path / "data", str(tmp_path / "seed.json")) as emu:
        emu.app_key, emu.app_secret, emu.org = "k1", "s1", "o1"
        # The first size goes alone, then eight at once (the API bound's start): the
        # last three come a round after the second file is opened.
        emu.faults({"kind": "latency", "match": "files.getFileInfo", "seconds": 0.3})
        async with ops_for(emu) as ops:
            folder = await walk(ops, "o1/A/feature")
            for name in ("f00.bin", "f01.bin"):
                attrs = await ops.lookup(folder.st_ino, name.encode())
                fi = await ops.open(attrs.st_ino, os.O_RDONLY, None)
                assert len(await ops.read(fi.fh, 0, 65536)) == 65536
                await ops.release(fi.fh)
            with trio.fail_after(10):
                while emu.stats().get("files.download", 0) < len(names):
                    await trio.sleep(0.05)
            emu.reset_stats()
            for name in names[2:]:
                attrs = await ops.lookup(folder.st_ino, f"{name}.bin".encode())
                fi = await ops.open(attrs.st_ino, os.O_RDONLY, None)
                data = await ops.read(fi.fh, 0, 65536)
                assert hashlib.md5(data).hexdigest() == emu.blobs()[fi_uri(ops, attrs)]["md5"]
                await ops.release(fi.fh)
            assert emu.stats().get("files.download", 0) == 0  # every one fetched ahead


def fi_uri(ops: EnosFS, attrs: pyfuse3.EntryAttributes) -> str:
    node = ops.ns.get(attrs.st_ino)
    assert isinstance(node, File)
    return node.ref.uri
