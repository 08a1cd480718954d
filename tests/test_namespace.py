"""Layer 1: the tree's metadata over the catalog, in-process on a fake organisation
(tests/fake_listings.py) with trio's autojump clock: listings that do not size, a folder
sized at once when asked, negative answers remembered, and listings read ahead for a
walk. Calls are counted at the fake; the kernel's part is in test_walk_mount.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from enosfs.catalog import META_CONCURRENCY
from enosfs.changes import Changes
from enosfs.errors import NotFound, TransportError
from enosfs.namespace import Dir, DirKind, File, Namespace
from enosfs.throttle import ApiThrottle
from enosfs.walkahead import WalkAhead
from tests.fake_listings import ORG, ApiFault, FakeListings
from tests.test_catalog import demo, settings

LATENCY = 1.0


class Told(Changes):
    """Changes that keep what the kernel would have been told."""

    def __init__(self, nursery: trio.Nursery) -> None:
        super().__init__(nursery)
        self.names: list[str] = []

    def name_changed(self, d: Dir, name: str) -> None:
        self.names.append(f"{d.path}/{name}")


async def folder(ns: Namespace, path: str) -> Dir:
    d = ns.root
    for part in path.strip("/").split("/"):
        node = (await ns.children(d))[part]
        assert isinstance(node, Dir)
        d = node
    return d


async def files_of(ns: Namespace, d: Dir) -> dict[str, File]:
    return {k: v for k, v in (await ns.children(d)).items() if isinstance(v, File)}


def big_org(fake: FakeListings, assets: int, files: int = 3) -> list[str]:
    """`assets` devices of one model with `files` FILE attributes and one measurement
    point each."""
    idents = tuple(f"f{i}" for i in range(files))
    fake.model(ORG, "m", attributes=idents, measurepoints=("scada",))
    names = [f"A-{i:04d}" for i in range(assets)]
    for name in names:
        fake.device(
            ORG,
            name,
            model_id="m",
            attributes={i: fake.file(100 + n, ".txt") for n, i in enumerate(idents)},
            latest={"scada": fake.file(7, ".csv")},
        )
    return names


@pytest.mark.allow_warnings(r"sizing failed unexpectedly")
async def test_a_bug_in_sizing_fails_the_stat_not_the_mount(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeListings(latency=LATENCY)
    big_org(fake, 1)
    ns = Namespace(fake, settings())
    d = await folder(ns, f"{ORG}/A-0000/feature")
    f = next(iter((await files_of(ns, d)).values()))

    async def broken(*_: object, **__: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(ns.catalog, "sizes", broken)
    async with trio.open_nursery() as nursery:
        ns.nursery = nursery  # as in a mount: sizing runs in the mount's nursery
        with pytest.raises(TransportError):
            await ns.file_meta(f)
    assert not d.sizing  # nothing left waiting


async def test_a_listing_sizes_nothing_and_the_first_stat_sizes_the_folder_at_once(
    autojump_clock: MockClock,
) -> None:
    fake = FakeListings(latency=LATENCY)
    big_org(fake, 1, files=2 * META_CONCURRENCY - 1)
    ns = Namespace(fake, settings())
    d = await folder(ns, f"{ORG}/A-0000/feature")
    files = await files_of(ns, d)
    assert len(files) == 2 * META_CONCURRENCY
    assert fake.counts["files.getFileInfo"] == 0
    assert all(f.meta is None for f in files.values())
    # `ls -l`: stat after stat, in listing order. The first pays for all of them, in
    # two rounds of META_CONCURRENCY calls in flight, not one round trip per file.
    started = trio.current_time()
    for name in sorted(files):
        meta = await ns.file_meta(files[name])
        assert meta.size == fake.metas[files[name].ref.uri].size
    assert trio.current_time() - started == pytest.approx(2 * LATENCY)
    assert fake.counts["files.getFileInfo"] == len(files)
    assert fake.peak["files.getFileInfo"] == META_CONCURRENCY


async def test_a_file_waits_for_its_own_size_not_for_its_whole_folder(
    autojump_clock: MockClock,
) -> None:
    """Opening one file of a large folder not sized yet costs one round trip: its
    folder's batch goes on behind it, for the `ls -l` that may follow."""
    fake = FakeListings(latency=LATENCY)
    big_org(fake, 1, files=3 * META_CONCURRENCY)
    ns = Namespace(fake, settings())
    async with trio.open_nursery() as nursery:
        ns.nursery = nursery  # as in a mount: the batch runs in the mount's nursery
        files = await files_of(ns, await folder(ns, f"{ORG}/A-0000/feature"))
        wanted = files[sorted(files)[-1]]
        started = trio.current_time()
        meta = await ns.file_meta(wanted)
        assert meta.size == fake.metas[wanted.ref.uri].size
        assert trio.current_time() - started == pytest.approx(LATENCY)
        assert sum(f.meta is None for f in files.values()) >= META_CONCURRENCY
        # The rest of the batch still ends, and everyone waiting for it is answered.
        await ns.size_folder(wanted.parent)  # type: ignore[arg-type]
        assert all(f.meta is not None for f in files.values())
        assert fake.counts["files.getFileInfo"] == len(files)
        assert not wanted.parent.sizing  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


async def test_stats_of_one_folder_at_once_share_one_batch(autojump_clock: MockClock) -> None:
    fake = FakeListings(latency=LATENCY)
    big_org(fake, 1, files=4)
    ns = Namespace(fake, settings())
    files = await files_of(ns, await folder(ns, f"{ORG}/A-0000/feature"))
    async with trio.open_nursery() as nursery:
        for f in files.values():
            nursery.start_soon(ns.file_meta, f)
    assert fake.counts["files.getFileInfo"] == len(files)
    # Within the TTL, asked again: nothing; past it, the folder again, at once.
    for f in files.values():
        await ns.file_meta(f)
    assert fake.counts["files.getFileInfo"] == len(files)
    await trio.sleep(ns.ttl)
    await ns.file_meta(next(iter(files.values())))
    assert fake.counts["files.getFileInfo"] == 2 * len(files)


async def test_a_file_found_gone_when_sized_leaves_its_folder() -> None:
    fake, known = demo()
    gone = known["WTG-002/feature/manual.pdf"]
    del fake.metas[gone]
    ns = Namespace(fake, settings())
    async with trio.open_nursery() as nursery:
        told = Told(nursery)
        ns.changes = told
        d = await folder(ns, f"{ORG}/WTG-002/feature")
        files = await files_of(ns, d)
        assert "manual.pdf" in files  # a listing cannot know
        await ns.file_meta(files["photo.png"])
        assert "manual.pdf" not in await files_of(ns, d)
        assert told.names == [f"/{ORG}/WTG-002/feature/manual.pdf"]
        assert fake.counts["files.getFileInfo"] == 3  # one batch
        # Its node, asked for again (the `ls -l` that listed it) hears why at once,
        # and its name is missing without a call.
        with pytest.raises(NotFound):
            await ns.file_meta(files["manual.pdf"])
        assert await ns.lookup(d, "manual.pdf") is None
        assert fake.counts["files.getFileInfo"] == 3
        nursery.cancel_scope.cancel()


@pytest.mark.allow_warnings(r"no metadata for")
async def test_a_file_that_failed_is_not_asked_again_by_its_siblings_batches(
    autojump_clock: MockClock,
) -> None:
    fake, known = demo()
    limited = known["WTG-002/feature/scada.csv"]
    fake.faults.append(ApiFault("rate_limit", match="files.getFileInfo", about=limited, times=1))
    ns = Namespace(fake, settings())
    files = await files_of(ns, await folder(ns, f"{ORG}/WTG-002/feature"))
    await ns.file_meta(files["photo.png"])
    assert fake.counts["files.getFileInfo"] == 3
    assert files["scada.csv"].meta is None  # listed all the same
    # Its own stat asks again (and here gets it), the others' do not.
    assert (await ns.file_meta(files["scada.csv"])).size == fake.metas[limited].size
    assert fake.counts["files.getFileInfo"] == 4


async def test_missing_names_are_asked_once_per_negative_ttl(autojump_clock: MockClock) -> None:
    fake, _ = demo()
    ns = Namespace(fake, settings())
    assert ns.negative_ttl < ns.ttl
    org = await folder(ns, ORG)
    feature = await folder(ns, f"{ORG}/WTG-002/feature")
    asset = await folder(ns, f"{ORG}/WTG-002")
    before = fake.counts.copy()
    for _ in range(3):
        assert await ns.lookup(feature, "foo.so") is None
        assert await ns.lookup(org, "NO-SUCH-ASSET") is None
    assert fake.counts["files.getFileInfo"] == before["files.getFileInfo"] + 1
    assert fake.counts["devices.get"] == before["devices.get"] + 1
    # Names no asset or file can have, and any name in an asset's own folder: no call.
    asked = sum(fake.counts.values())
    for d in (org, asset, feature):
        for name in (".git", "__pycache__", ".hidden", "a b", "x\\.."):
            assert await ns.lookup(d, name) is None
    assert sum(fake.counts.values()) == asked
    await trio.sleep(ns.negative_ttl)
    assert await ns.lookup(feature, "foo.so") is None
    assert await ns.lookup(org, "NO-SUCH-ASSET") is None
    assert fake.counts["files.getFileInfo"] == before["files.getFileInfo"] + 2
    assert fake.counts["devices.get"] == before["devices.get"] + 2


class Recorded(FakeListings):
    """A fake that writes down, in order, which asset's listing was asked and which
    asset the walk visited."""

    def __init__(self) -> None:
        super().__init__(latency=LATENCY)
        self.events: list[tuple[str, str]] = []

    async def query_latest(self, org: str, asset_id: str, ids: list[str]) -> dict[str, Any]:
        self.events.append(("asked", asset_id))
        return await super().query_latest(org, asset_id, ids)

    def first(self, what: str, asset: str) -> int:
        return self.events.index((what, asset))


@asynccontextmanager
async def walking(assets: int) -> AsyncIterator[tuple[Recorded, Namespace, WalkAhead, Dir]]:
    fake = Recorded()
    big_org(fake, assets)
    ns = Namespace(fake, settings())
    async with trio.open_nursery() as nursery:
        ahead = WalkAhead(ns, nursery)
        yield fake, ns, ahead, await folder(ns, ORG)
        nursery.cancel_scope.cancel()


async def visit(fake: Recorded, ns: Namespace, ahead: WalkAhead, asset: Dir) -> None:
    """What `find` does in an asset: list it, then each category, in order. Between
    two system calls of the walker, the mount's other tasks run."""
    await trio.testing.wait_all_tasks_blocked()
    fake.events.append(("visited", asset.asset))
    ahead.visited(asset)
    for d in (await ns.children(asset)).values():
        assert isinstance(d, Dir)
        ahead.visited(d)
        await ns.children(d)


async def asset_folders(ns: Namespace, org: Dir) -> list[Dir]:
    """The org's asset folders in listing order, without by-name/ and by-key/ beside
    them (a walk visits those too, but they list nothing of their own)."""
    listed = sorted((await ns.children(org)).items())
    return [d for _, d in listed if isinstance(d, Dir) and d.kind is DirKind.ASSET]


async def test_a_walk_in_listing_order_gets_the_next_assets_listed_ahead(
    autojump_clock: MockClock,
) -> None:
    async with walking(200) as (fake, ns, ahead, org):
        assets = await asset_folders(ns, org)
        started = trio.current_time()
        for asset in assets:
            assert isinstance(asset, Dir)
            await visit(fake, ns, ahead, asset)
        took = trio.current_time() - started
        names = [a.name for a in assets]
        # The first two are asked as they are visited; from then on the listings are
        # asked before the walk gets there, but for the odd one where the walk (which
        # costs no time here) catches up with the bound on listings in flight.
        for name in names[:2]:
            assert fake.first("visited", name) < fake.first("asked", name)
        ahead_of_walk = [
            name for name in names if fake.first("asked", name) < fake.first("visited", name)
        ]
        assert names[2] in ahead_of_walk
        assert len(ahead_of_walk) >= 0.9 * len(names)
        # Every asset listed once, ahead or not, never more than the bound at once
        # (plus the walk's own), and so in far fewer round trips than one per asset.
        assert fake.counts["measurepoints.queryLatest"] == len(assets)
        assert fake.peak["measurepoints.queryLatest"] <= ahead.limit.total_tokens + 1
        assert took < len(assets) * LATENCY / 4
        assert fake.counts["files.getFileInfo"] == 0


async def test_a_walk_that_asks_for_sizes_gets_the_next_assets_sized_ahead(
    autojump_clock: MockClock,
) -> None:
    """`ls -lR`: every file of a folder is stat'ed after its listing; from the third
    asset on, the sizes are there before the walk asks."""
    async with walking(100) as (fake, ns, ahead, org):
        assets = await asset_folders(ns, org)
        waited: list[str] = []
        files = 0
        started = trio.current_time()
        for asset in assets:
            assert isinstance(asset, Dir)
            await visit(fake, ns, ahead, asset)
            for d in (await ns.children(asset)).values():
                assert isinstance(d, Dir)
                for f in (await ns.children(d)).values():
                    assert isinstance(f, File)
                    files += 1
                    if not ns.meta_fresh(f):
                        waited.append(asset.name)
                    assert (await ns.file_meta(f)).size is not None
        took = trio.current_time() - started
        assert fake.counts["files.getFileInfo"] == files  # each sized once
        assert len(set(waited)) <= 0.25 * len(assets), waited  # the walk here costs no time
        assert took < len(assets) * LATENCY / 4
        assert ahead.counts["sized_folders"] > 0


async def test_a_random_visit_lists_no_other_asset(autojump_clock: MockClock) -> None:
    async with walking(50) as (fake, ns, ahead, org):
        children = await ns.children(org)
        for name in ("A-0017", "A-0003", "A-0040", "A-0044"):
            asset = children[name]
            assert isinstance(asset, Dir)
            await visit(fake, ns, ahead, asset)
        await trio.sleep(10 * LATENCY)
        assert fake.counts["measurepoints.queryLatest"] == 4
        assert ahead.counts["listings"] == 0


class Gated(Recorded):
    """The fake behind the API bound, as the client's calls are (throttle.py): what it
    answered, in order."""

    def __init__(self, throttle: ApiThrottle) -> None:
        super().__init__()
        self.throttle = throttle
        self.answered: list[tuple[str, tuple[str, ...]]] = []

    async def _call(self, kind: str, about: tuple[str, ...], what: str) -> None:
        async with self.throttle.slot():
            await super()._call(kind, about, what)
        self.answered.append((kind, about))


async def test_a_users_lookup_is_answered_before_a_walks_read_ahead_drains(
    autojump_clock: MockClock,
) -> None:
    """`ls -lR` has queued the next assets' listings and sizes in the API bound; a user
    who opens a file elsewhere waits for a slot or two, not for the queue."""
    throttle = ApiThrottle(4, start=4)
    fake = Gated(throttle)
    big_org(fake, 60, files=10)
    ns = Namespace(fake, settings())
    async with trio.open_nursery() as nursery:
        ns.nursery = nursery
        ahead = WalkAhead(ns, nursery)
        assets = await asset_folders(ns, await folder(ns, ORG))
        await visit(fake, ns, ahead, assets[0])
        for f in (await files_of(ns, await folder(ns, f"{ORG}/A-0000/feature"))).values():
            await ns.file_meta(f)  # sizes asked: the walk gets them fetched ahead
        for asset in assets[1:3]:
            await visit(fake, ns, ahead, asset)
        await trio.testing.wait_all_tasks_blocked()
        queued = throttle.stats()["waiting_ahead"]
        assert queued >= 8, queued
        assert throttle.stats()["waiting"] == queued  # nobody else waits

        started = len(fake.answered)
        elsewhere = await files_of(ns, await folder(ns, f"{ORG}/{assets[-1].name}/feature"))
        wanted = elsewhere[sorted(elsewhere)[3]]
        meta = await ns.file_meta(wanted)
        assert meta.size == fake.metas[wanted.ref.uri].size
        # Its listing and its size went ahead of the queue: a few calls made ahead were
        # answered meanwhile (those in flight when each of its two calls came), not the
        # queue.
        assert len(fake.answered) - started <= 5 * throttle.limit < queued
        assert throttle.stats()["waiting_ahead"] > 0
        # The rest of the read-ahead still ends, and nothing is left in the bound.
        while throttle.stats()["waiting"] or throttle.in_use:
            await trio.sleep(LATENCY)
        assert ahead.counts["failed"] == 0
        assert ahead.counts["sized_folders"] > 0
        sized = await files_of(ns, await folder(ns, f"{ORG}/{assets[4].name}/feature"))
        assert all(ns.meta_fresh(f) for f in sized.values())  # sized ahead, all of it
        nursery.cancel_scope.cancel()
