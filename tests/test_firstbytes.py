"""A file named on its own gets its first bytes asked for with its size (firstbytes.py):
the unit's rules with a fake opener and a mock clock, then real mounts."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from enosfs import fs as fs_module
from enosfs.api import FileMeta
from enosfs.errors import TransportError
from enosfs.firstbytes import KEEP, MOST, PAUSE, WASTED_PAUSE, FirstBytes
from enosfs.namespace import File

from .support import Emulator, demo_files, mounted, stats_of, wait_for
from .test_fs_ops import ops_for, walk


class Opener:
    """Bodies that record being opened and closed; `fail` makes the next ones fail."""

    def __init__(self) -> None:
        self.opened: list[tuple[Any, int, int]] = []
        self.closed: list[Any] = []
        self.fail = False
        self.delay = 0.0

    @asynccontextmanager
    async def __call__(self, ref: Any, first: int, last: int) -> AsyncIterator[str]:
        self.opened.append((ref, first, last))
        await trio.sleep(self.delay)
        if self.fail:
            raise TransportError("refused")
        try:
            yield f"body of {ref}"
        finally:
            self.closed.append(ref)


async def test_a_body_is_taken_once_and_closed_when_its_reader_lets_go() -> None:
    opener = Opener()
    opener.delay = 0.05  # the reader comes before the head: it waits for it
    async with trio.open_nursery() as nursery:
        fb = FirstBytes(opener, nursery, size=1000)
        fb.start("a")
        fb.start("a")  # asked for already
        async with fb.taking("a") as body:
            assert body == "body of a"
            await trio.sleep(0.1)
            assert opener.closed == []  # still the reader's
            async with fb.taking("a") as again:
                assert again is None  # taken once only
        await trio.sleep(0.01)
        assert opener.closed == ["a"]
    assert opener.opened == [("a", 0, 999)]
    assert fb.stats()["taken"] == 1 and fb.stats()["wasted"] == 0


async def test_a_body_nobody_takes_is_closed_after_keep_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    opener = Opener()
    async with trio.open_nursery() as nursery:
        fb = FirstBytes(opener, nursery)
        fb.start("a")
        await trio.sleep(KEEP + 0.5)
        assert opener.closed == ["a"]
        async with fb.taking("a") as body:
            assert body is None  # the reader asks for its own
    assert fb.stats()["wasted"] == 1


async def test_bodies_wasted_in_a_row_pause_them_and_a_taken_one_resets_the_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    opener = Opener()
    async with trio.open_nursery() as nursery:
        fb = FirstBytes(opener, nursery)
        for i in range(WASTED_PAUSE - 1):
            fb.start(i)
        await trio.sleep(KEEP + 0.5)
        fb.start("taken")
        async with fb.taking("taken") as body:
            assert body is not None
        for i in range(WASTED_PAUSE):
            fb.start(("again", i))
        await trio.sleep(KEEP + 0.5)
        sent = len(opener.opened)
        fb.start("paused")  # WASTED_PAUSE in a row since the taken one: paused
        await trio.sleep(0.1)
        assert len(opener.opened) == sent
        assert fb.stats()["paused"] == 1
        await trio.sleep(PAUSE)
        fb.start("later")
        await trio.sleep(0.1)
        assert len(opener.opened) == sent + 1
        nursery.cancel_scope.cancel()


async def test_a_failed_body_leaves_the_reader_to_ask_and_at_most_most_are_held(
    autojump_clock: trio.testing.MockClock,
) -> None:
    opener = Opener()
    async with trio.open_nursery() as nursery:
        fb = FirstBytes(opener, nursery)
        opener.fail = True
        fb.start("bad")
        async with fb.taking("bad") as body:
            assert body is None
        assert fb.stats()["failed"] == 1
        opener.fail = False
        for i in range(MOST + 3):
            fb.start(i)
        await trio.sleep(0.1)
        assert len(opener.opened) == 1 + MOST
        nursery.cancel_scope.cancel()
    assert fb.early == {}  # nothing left behind by a cancelled hold


# -- the file system's side, on the emulator without a mount ----------------------------


async def test_a_held_body_is_neither_a_round_trip_sample_nor_a_resume(emu: Emulator) -> None:
    """Its head came before anyone asked: timing it would make the link look a round
    trip away at no distance (and random misses one page long); ending where its own
    range ends is no cut body."""
    rel = "WTG-001/feature/vibration_raw.bin"
    want = emu.blob(demo_files(emu)[rel])[: 1 << 20]
    emu.network(network="rtt=20ms")
    try:
        async with ops_for(emu) as ops, trio.open_nursery() as nursery:
            ops.first_bytes = ops.cache.client.first_bytes  # type: ignore[attr-defined]
            ops.first_bytes.nursery = nursery
            attrs = await walk(ops, f"{emu.org}/{rel}")
            info = await ops.open(attrs.st_ino, os.O_RDONLY)
            got = bytes(await ops.read(info.fh, 0, 1 << 20))
            await ops.release(info.fh)
            assert got == want
            assert ops.first_bytes.stats()["taken"] == 1
            assert ops.cache.counts["resumes"] == 0
            rtt = ops.cache.link.rtt  # from the bodies asked for as the reader waited
            assert rtt is None or rtt > 0.015, rtt
            nursery.cancel_scope.cancel()
    finally:
        emu.network(network="")


async def test_a_stale_record_without_a_size_is_looked_up_without_error(emu: Emulator) -> None:
    opener = Opener()
    async with ops_for(emu) as ops, trio.open_nursery() as nursery:
        ops.first_bytes = FirstBytes(opener, nursery)
        folder = await walk(ops, f"{emu.org}/WTG-001/feature")
        node = ops.ns.get((await ops.lookup(folder.st_ino, b"scada_export.csv")).st_ino)
        assert isinstance(node, File)
        # The server once would not say how large it was, and that is old now.
        node.meta, node.meta_at = FileMeta(node.ref.uri, None), float("-inf")
        attrs = await ops.lookup(folder.st_ino, b"scada_export.csv")
        assert attrs.st_size == len(emu.blob(node.ref.uri))
        assert opener.opened and opener.opened[0][0] == node.ref
        nursery.cancel_scope.cancel()


async def test_listing_times_are_kept_for_the_newest_folders_only(
    emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fs_module, "LISTED_KEPT", 2)
    async with ops_for(emu) as ops:
        inodes = []
        for asset in ("WTG-001", "WTG-002", "WTG-003"):
            inode = (await walk(ops, f"{emu.org}/{asset}/feature")).st_ino
            await ops.releasedir(await ops.opendir(inode, None))
            inodes.append(inode)
        assert list(ops.listed_at) == inodes[1:]


# -- real mounts --------------------------------------------------------------------------


def _spans(emu: Emulator, kind: str) -> list[dict[str, Any]]:
    return [s for s in emu.admin("GET", "trace")["spans"] if s["kind"] == kind]


def test_a_file_opened_by_name_is_downloaded_while_its_size_is_asked(
    emu: Emulator, work: Path
) -> None:
    """Far away (60 ms a round trip), `open` and the first read of a file nothing listed
    yet: its download reaches the server before its size is answered, so the first
    byte costs the round trip of the size and no second one."""
    rel = "WTG-002/feature/scada_export.csv"
    want = emu.blob(demo_files(emu)[rel])
    emu.network(network="rtt=60ms")
    try:
        with mounted(work, emu) as m:
            emu.reset_stats()
            fd = os.open(m.org / rel, os.O_RDONLY)
            try:
                assert os.pread(fd, 4096, 0) == want[:4096]
            finally:
                os.close(fd)
            downloads = _spans(emu, "files.download")
            sizes = _spans(emu, "files.getFileInfo")
            stats = stats_of(m.path)
    finally:
        emu.network(network="")
    assert len(downloads) == 1, downloads  # the body asked for at lookup, and no other
    first_size = min(s["answered_ms"] for s in sizes)
    assert downloads[0]["arrived_ms"] < first_size, (downloads, sizes)
    assert stats["first_bytes"]["sent"] == 1
    assert stats["first_bytes"]["taken"] == 1


@pytest.mark.parametrize(
    ("rel", "length"),
    [
        ("WTG-003/feature/scada_export.csv", None),  # whole in the body, checked whole
        ("WTG-003/feature/blade_scan.dat", None),  # in object storage, several blocks
        ("WTG-001/feature/vibration_raw.bin", 3 * 1024 * 1024 + 5),  # its start
    ],
)
def test_a_file_read_after_its_first_bytes_came_at_lookup_is_right(
    emu: Emulator, work: Path, rel: str, length: int | None
) -> None:
    """The body asked for at lookup holds 128 KiB; the rest is fetched from where it
    ends, and the checks are those of any body. (Firmware is not among these: its
    listing gives its size, so its lookup waits for nothing and sends no body.)"""
    want = emu.blob(demo_files(emu)[rel])[:length]
    with mounted(work, emu) as m:
        with open(m.org / rel, "rb") as f:
            got = f.read() if length is None else f.read(length)
        stats = stats_of(m.path)
        log = m.log_text()
    assert hashlib.md5(got).hexdigest() == hashlib.md5(want).hexdigest()
    assert stats["first_bytes"]["taken"] == 1
    assert "ERROR" not in log


def test_a_listed_folder_is_sized_without_any_download(emu: Emulator, work: Path) -> None:
    """`ls -l`: a listing, then each name's size. Its lookups are the listing's: no
    first bytes go."""
    with mounted(work, emu) as m:
        folder = m.org / "WTG-001" / "feature"
        sizes = {name: os.stat(folder / name).st_size for name in os.listdir(folder)}
        stats = stats_of(m.path)
    assert sizes and all(size >= 0 for size in sizes.values())
    assert stats["first_bytes"]["sent"] == 0
    assert emu.stats().get("files.download", 0) == 0


def test_a_stat_by_name_sends_one_body_and_closes_it_unread(emu: Emulator, work: Path) -> None:
    """`stat` of a file named on its own looks like an open until the open does not
    come: its body is let go after KEEP seconds, and counted."""
    rel = "WTG-001/feature/vibration_raw.bin"  # 200 MiB: only the asked-for part moves
    with mounted(work, emu) as m:
        assert os.stat(m.org / rel).st_size == 200 * 1024 * 1024
        wait_for(
            lambda: stats_of(m.path)["first_bytes"]["wasted"] == 1,
            "the unread body to be let go",
            timeout=KEEP + 10,
        )
        stats = stats_of(m.path)
    assert stats["first_bytes"]["sent"] == 1
    assert emu.stats().get("files.download", 0) == 1
