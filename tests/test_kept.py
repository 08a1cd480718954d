"""The tree over a metadata store kept by an earlier mount, in-process: a fake
organisation (tests/fake_listings.py), a real store in a temporary folder, trio's
autojump clock for the tree and a hand-set wall clock for the store. What is kept is
served at once, fresh until it would have expired and asked again behind it after."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from trio.testing import MockClock

from enosfs.api import FileMeta
from enosfs.changes import Changes
from enosfs.metastore import MetaStore
from enosfs.namespace import File, Namespace
from enosfs.views import VIEW_NAMES
from tests.fake_listings import ORG, FakeListings
from tests.test_catalog import TTL, demo, settings
from tests.test_namespace import files_of, folder

WALL = 1_800_000_000.0


class Versions(Changes):
    """Changes that keep which files were told to have changed on the server."""

    def __init__(self, nursery: trio.Nursery) -> None:
        super().__init__(nursery)
        self.changed: list[str] = []

    def version_changed(self, f: File, old: FileMeta | None) -> None:
        self.changed.append(f.path)


@asynccontextmanager
async def mount(
    fake: FakeListings, folder_: Path, wall: float
) -> AsyncIterator[tuple[Namespace, Versions]]:
    """A namespace as a mount has it: its store, its nursery, its writer; the store
    flushed and closed at the end, as an unmount does."""
    store = await MetaStore.open(folder_)
    assert store is not None
    ns = Namespace(fake, settings())
    ns.catalog.store = store
    ns.catalog.wall = lambda: wall + trio.current_time()
    async with trio.open_nursery() as nursery:
        ns.nursery = nursery
        changes = Versions(nursery)
        ns.changes = changes
        nursery.start_soon(store.run)
        try:
            yield ns, changes
        finally:
            # No deadline: the autojump clock would pass one while the disk works.
            await store.flush(float("inf"))
            await store.close()
            nursery.cancel_scope.cancel()


async def walk(ns: Namespace) -> dict[str, int | None]:
    """Every file of the org with its size (stat of each): `ls -lR`."""
    out: dict[str, int | None] = {}
    for asset in sorted(await ns.children(await folder(ns, ORG))):
        if asset in VIEW_NAMES:  # links to the same assets, not more files
            continue
        for category in ("feature", "ota"):
            for f in (await files_of(ns, await folder(ns, f"{ORG}/{asset}/{category}"))).values():
                out[f.path] = (await ns.file_meta(f)).size
    return out


async def test_kept_listings_and_sizes_are_served_with_no_call_until_they_expire(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    fake, _ = demo()
    async with mount(fake, tmp_path, WALL) as (ns, _):
        first = await walk(ns)
    assert fake.counts["files.getFileInfo"] > 0
    fake.counts.clear()
    # Remounted 10 s of wall time later: all of it fresh for TTL - 10 s more.
    async with mount(fake, tmp_path, WALL + 10 - trio.current_time()) as (ns, _):
        assert await walk(ns) == first
        assert sum(fake.counts.values()) == 0
        await trio.sleep(TTL - 10 - 1)
        await walk(ns)
        assert sum(fake.counts.values()) == 0
        await trio.sleep(2)  # now past the time they were fetched + TTL
        await walk(ns)
        assert fake.counts["files.getFileInfo"] > 0
        assert fake.counts["devices.search"] == 1


async def test_a_stale_listing_is_served_at_once_and_a_stale_size_is_asked_again(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    fake, known = demo()
    fake.latency = 1.0
    async with mount(fake, tmp_path, WALL) as (ns, _):
        first = await walk(ns)
    changed = known["WTG-001/feature/scada.csv"]
    fake.metas[changed] = dataclasses.replace(fake.metas[changed], size=55, md5="f" * 32)
    fake.counts.clear()
    async with mount(fake, tmp_path, WALL + 2 * TTL - trio.current_time()) as (ns, told):
        d = await folder(ns, f"{ORG}/WTG-001/feature")
        started = trio.current_time()
        files = await files_of(ns, d)
        # Names at once, from the store, though past the TTL...
        assert trio.current_time() == started
        assert set(files) == {"manual.pdf", "photo.png", "scada.csv"}
        # ... and listed again behind them.
        await trio.sleep(10)
        assert fake.counts["devices.search"] == 1
        assert fake.counts["measurepoints.queryLatest"] == 1
        # A size past its TTL is never served without asking again.
        assert (await ns.file_meta(files["scada.csv"])).size == 55
        assert told.changed == [f"/{ORG}/WTG-001/feature/scada.csv"]
        assert (await ns.file_meta(files["photo.png"])).size == first[files["photo.png"].path]


async def test_refresh_drops_what_was_kept(autojump_clock: MockClock, tmp_path: Path) -> None:
    """`enosfs refresh` of the org before its assets were listed: the kept listings
    (still fresh) are not offered any more."""
    fake, _ = demo()
    async with mount(fake, tmp_path, WALL) as (ns, _):
        await walk(ns)
    fake.counts.clear()
    async with mount(fake, tmp_path, WALL + 1 - trio.current_time()) as (ns, _):
        org = await folder(ns, ORG)
        assert sum(fake.counts.values()) == 0
        ns.refresh(org)
        await ns.children(await folder(ns, f"{ORG}/WTG-001/feature"))
        assert fake.counts["devices.search"] == 1
        assert fake.counts["measurepoints.queryLatest"] == 1
