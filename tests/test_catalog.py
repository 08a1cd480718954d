"""Layer 1: the catalog (what EnOS says exists), in-process on a fake organisation
(tests/fake_listings.py) whose calls are counted and whose faults are scripted, with a
clock of the test's own so that TTLs pass without waiting. No emulator, no FUSE; one
test checks, against the emulator, that the fake tells the catalog what the real client
does."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from enosfs.api import BadRecord, FileMeta, FileRef
from enosfs.catalog import META_CONCURRENCY, Catalog, Entry
from enosfs.config import SECRET_ENV, Settings, settings_from_dict
from enosfs.errors import DeadlineError, NotFound, RateLimited
from enosfs.expiring import Expiring
from enosfs.naming import uri_id
from tests.fake_listings import ORG, ApiFault, FakeListings
from tests.support import Emulator, demo_files
from tests.test_client import client_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(
    org: dict[str, Any] | None = None, files: list[dict[str, str]] | None = None
) -> Settings:
    raw: dict[str, Any] = {
        "enos": {"gateway": "http://127.0.0.1:9", "app_key": "app"},
        "org": [{"id": ORG, **(org or {})}],
    }
    if files:
        raw["file"] = files
    return settings_from_dict(raw, {SECRET_ENV: "secret"})


TTL = settings().metadata_ttl


def demo() -> tuple[FakeListings, dict[str, str]]:
    """An organisation shaped like the emulator's demo, and "ASSET/category/name" ->
    fileUri of every file a listing must show: two turbines and an inverter, files in
    attributes and in measurement points, FILE features with no value and values that
    are not files, firmware the search sizes and one it does not."""
    fake = FakeListings()
    files: dict[str, str] = {}
    fake.model(ORG, "turbine", attributes=("manual", "notes", "photo"), measurepoints=("scada",))
    fake.model(ORG, "inverter", attributes=("datasheet",), measurepoints=("daily_yield",))
    for asset in ("WTG-001", "WTG-002"):
        manual, photo, scada = fake.file(2000, ".pdf"), fake.file(300, ".png"), fake.file(5, ".csv")
        fake.device(
            ORG,
            asset,
            model_id="turbine",
            product_key="pkTurbine",
            attributes={"manual": manual, "photo": photo, "rated_power": 3000.0},
            latest={"scada": scada, "wind_speed": 7.5},
        )
        files[f"{asset}/feature/manual.pdf"] = manual
        files[f"{asset}/feature/photo.png"] = photo
        files[f"{asset}/feature/scada.csv"] = scada
    datasheet, daily = fake.file(700, ".json"), fake.file(900, ".csv")
    fake.device(
        ORG,
        "INV-101",
        model_id="inverter",
        product_key="pkInverter",
        attributes={"datasheet": datasheet},
        latest={"daily_yield": daily},
    )
    files["INV-101/feature/datasheet.json"] = datasheet
    files["INV-101/feature/daily_yield.csv"] = daily
    for product, name, version, listed in (
        ("pkTurbine", "controller", "4.1.0", True),
        ("pkTurbine", "controller", "4.2.1", False),
        ("pkInverter", "dsp", "2.3.1", True),
    ):
        fw = fake.firmware(ORG, product, name, version, 4096, listed_size=listed)
        for asset in ("WTG-001", "WTG-002") if product == "pkTurbine" else ("INV-101",):
            files[f"{asset}/ota/{name}-{version}.bin"] = fw.url
    return fake, files


def expected(files: dict[str, str], asset: str, category: str) -> dict[str, str]:
    """File name -> fileUri that the listing of one category must show."""
    prefix = f"{asset}/{category}/"
    return {rel.removeprefix(prefix): uri for rel, uri in files.items() if rel.startswith(prefix)}


def test_expiring_answers_fresh_until_ttl_then_only_last() -> None:
    clock = Clock()
    cache: Expiring[str, list[int]] = Expiring(10.0, clock)
    assert cache.fresh("a") is None and cache.last("a") is None
    cache.put("a", [])
    assert cache.fresh("a") == []  # an empty answer is an answer
    clock.now += 10.0
    assert cache.fresh("a") is None
    assert cache.last("a") == []


async def test_entries_of_both_categories_are_found_without_sizing() -> None:
    fake, files = demo()
    catalog = Catalog(fake, settings(), clock=Clock())
    assert await catalog.asset_ids(ORG) == ["INV-101", "WTG-001", "WTG-002"]
    unsized: list[Entry] = []
    for category in ("feature", "ota"):
        want = expected(files, "WTG-002", category)
        assert want, category
        entries = await catalog.entries(ORG, "WTG-002", category)
        assert {e.wanted: e.uri for e in entries} == want
        for e in entries:
            assert e.origin["uri"] == e.uri
            if e.meta is None:
                unsized.append(e)
            else:  # the firmware search gave it
                assert category == "ota" and e.meta.size == fake.metas[e.uri].size
    # A listing asks no size: `find` needs none.
    assert fake.counts["files.getFileInfo"] == 0
    # Three feature files, and the one firmware whose size the search left out.
    assert len(unsized) == 3 + 1
    refs = [FileRef(ORG, "WTG-002", "feature", e.uri) for e in unsized]
    found = await catalog.sizes(refs + refs[:1])
    assert {uri: getattr(m, "size", m) for uri, m in found.items()} == {
        e.uri: fake.metas[e.uri].size for e in unsized
    }
    assert fake.counts["files.getFileInfo"] == len(unsized)  # a fileUri asked once


async def test_device_and_model_are_asked_once_per_ttl() -> None:
    fake, _ = demo()
    clock = Clock()
    catalog = Catalog(fake, settings(), clock=clock)
    first = await catalog.entries(ORG, "WTG-002", "feature")
    asked = fake.counts.copy()
    again = await catalog.entries(ORG, "WTG-002", "feature")
    assert [e.uri for e in again] == [e.uri for e in first]
    # Device and model are fresh: only the latest values are asked again, as they are
    # what changes.
    now = fake.counts.copy()
    for kind in ("devices.get", "thing-models.get"):
        assert now[kind] == asked[kind], kind
    assert now["measurepoints.queryLatest"] == asked["measurepoints.queryLatest"] + 1
    clock.now += TTL
    await catalog.entries(ORG, "WTG-002", "feature")
    later = fake.counts
    assert later["devices.get"] == asked["devices.get"] + 1
    assert later["thing-models.get"] == asked["thing-models.get"] + 1
    assert later["files.getFileInfo"] == 0


async def test_assets_sharing_a_model_and_a_product_ask_for_each_once_per_ttl() -> None:
    fake, _ = demo()
    clock = Clock()
    catalog = Catalog(fake, settings(), clock=clock)
    await catalog.asset_ids(ORG)  # device search: the devices need not be asked one by one
    for _ in range(2):
        for asset in ("WTG-001", "WTG-002"):
            for category in ("feature", "ota"):
                await catalog.entries(ORG, asset, category)
        assert fake.counts["devices.get"] == 0
        assert fake.counts["thing-models.get"] == 1
        assert fake.counts["ota-firmwares.search"] == 1
    clock.now += TTL
    await catalog.entries(ORG, "WTG-001", "ota")
    assert fake.counts["devices.get"] == 1
    assert fake.counts["ota-firmwares.search"] == 2


@pytest.mark.allow_warnings(r"not permitted")
async def test_denied_device_details_keep_the_last_answer_and_say_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, files = demo()
    clock = Clock()
    want = expected(files, "WTG-002", "feature")
    catalog = Catalog(fake, settings(), clock=clock)
    await catalog.entries(ORG, "WTG-002", "feature")
    fake.faults.append(ApiFault("deny", match="devices.get"))
    with caplog.at_level(logging.WARNING, logger="enosfs.catalog"):
        for _ in range(2):
            clock.now += TTL
            entries = await catalog.entries(ORG, "WTG-002", "feature")
            assert {e.wanted: e.uri for e in entries} == want
    said = [r for r in caplog.records if "not permitted" in r.getMessage()]
    assert len(said) == 1, said
    # Naming an asset no listing shows needs its details: denied, it is not there.
    assert not await catalog.has_asset(ORG, "WTG-001")


@pytest.mark.allow_warnings(r"firmware search .* not permitted")
async def test_a_denied_firmware_search_shows_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    fake, files = demo()
    extra = fake.file(10, ".bin")
    configured = {"org": ORG, "asset": "WTG-002", "category": "ota", "uri": extra}
    catalog = Catalog(fake, settings(files=[{**configured, "name": "extra.bin"}]), clock=Clock())
    fake.faults.append(ApiFault("deny", match="ota-firmwares.search"))
    with caplog.at_level(logging.WARNING, logger="enosfs.catalog"):
        ota = await catalog.entries(ORG, "WTG-002", "ota")
        assert await catalog.entries(ORG, "INV-101", "ota") == []
        feature = await catalog.entries(ORG, "WTG-002", "feature")
    assert [(e.wanted, e.uri, e.origin["source"]) for e in ota] == [
        ("extra.bin", extra, "configuration")
    ]
    found = await catalog.sizes([FileRef(ORG, "WTG-002", "ota", extra)])
    assert getattr(found[extra], "size", None) == 10
    assert {e.wanted: e.uri for e in feature} == expected(files, "WTG-002", "feature")
    said = [r for r in caplog.records if "not permitted" in r.getMessage()]
    assert len(said) == 1, said


@pytest.mark.allow_warnings(r"not permitted")
async def test_a_denied_device_search_shows_the_configured_assets() -> None:
    fake, _ = demo()
    fake.faults.append(ApiFault("deny", match="devices.search"))
    file = {"org": ORG, "asset": "WTG-007", "uri": "enos-connect://abc.txt"}
    catalog = Catalog(fake, settings({"assets": ["WTG-009"]}, [file]), clock=Clock())
    assert await catalog.asset_ids(ORG) == ["WTG-007", "WTG-009"]
    # Where discovery is off, the search is not even asked.
    quiet = Catalog(fake, settings({"assets": ["WTG-009"], "discover": False}), clock=Clock())
    asked = fake.counts["devices.search"]
    assert await quiet.asset_ids(ORG) == ["WTG-009"]
    assert fake.counts["devices.search"] == asked


def refs_of(entries: list[Entry], asset: str, category: str) -> list[FileRef]:
    return [FileRef(ORG, asset, category, e.uri) for e in entries]


@pytest.mark.allow_warnings(r"not showing")
async def test_a_bad_record_costs_only_its_own_file_and_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, files = demo()
    bad = files["WTG-002/feature/photo.png"]
    fake.faults.append(ApiFault("bad_record", match="files.getFileInfo", about=bad))
    catalog = Catalog(fake, settings(), clock=Clock())
    with caplog.at_level(logging.WARNING, logger="enosfs.catalog"):
        for _ in range(2):
            entries = await catalog.entries(ORG, "WTG-002", "feature")
            found = await catalog.sizes(refs_of(entries, "WTG-002", "feature"))
            assert isinstance(found.pop(bad), BadRecord)
            assert all(isinstance(m, FileMeta) for m in found.values()) and len(found) == 2
    said = [r for r in caplog.records if "not showing" in r.getMessage()]
    assert len(said) == 1 and uri_id(bad) in said[0].getMessage(), said


@pytest.mark.allow_warnings(r"no metadata for")
async def test_a_size_that_cannot_be_had_is_said_and_the_rest_are_sized() -> None:
    fake, files = demo()
    limited = files["WTG-002/feature/scada.csv"]
    fake.faults.append(ApiFault("rate_limit", match="files.getFileInfo", about=limited))
    catalog = Catalog(fake, settings(), clock=Clock())
    entries = await catalog.entries(ORG, "WTG-002", "feature")
    found = await catalog.sizes(refs_of(entries, "WTG-002", "feature"))
    assert isinstance(found.pop(limited), RateLimited)
    assert all(isinstance(m, FileMeta) for m in found.values()) and len(found) == 2


async def test_a_referenced_file_that_does_not_exist_is_said_so() -> None:
    fake, files = demo()
    gone = files["WTG-002/feature/manual.pdf"]
    del fake.metas[gone]
    catalog = Catalog(fake, settings(), clock=Clock())
    entries = await catalog.entries(ORG, "WTG-002", "feature")
    assert gone in {e.uri for e in entries}  # the listing cannot know; sizing tells
    found = await catalog.sizes(refs_of(entries, "WTG-002", "feature"))
    assert isinstance(found[gone], NotFound)


async def test_a_slow_answer_is_waited_for_within_the_deadline(autojump_clock: MockClock) -> None:
    fake, files = demo()
    want = expected(files, "WTG-002", "feature")
    catalog = Catalog(fake, settings(), clock=Clock())
    slow = ApiFault("latency", match="measurepoints.queryLatest", seconds=fake.timeout / 2)
    fake.faults.append(slow)
    entries = await catalog.entries(ORG, "WTG-002", "feature")
    assert {e.wanted: e.uri for e in entries} == want
    # Past the deadline the listing fails (the tree then serves what it had).
    slow.seconds = fake.timeout * 2
    with pytest.raises(DeadlineError):
        await catalog.entries(ORG, "WTG-002", "feature")


async def test_sizes_are_asked_at_most_meta_concurrency_at_once(autojump_clock: MockClock) -> None:
    fake = FakeListings(latency=1.0)
    many = tuple(f"f{i:03d}" for i in range(3 * META_CONCURRENCY))
    fake.model(ORG, "big", attributes=many)
    for asset in ("A-1", "A-2"):
        fake.device(ORG, asset, model_id="big", attributes={i: fake.file(10, ".txt") for i in many})
    catalog = Catalog(fake, settings(), clock=Clock())
    found: dict[str, int] = {}

    async def size_one(asset: str) -> None:
        entries = await catalog.entries(ORG, asset, "feature")
        metas = await catalog.sizes(refs_of(entries, asset, "feature"))
        assert all(isinstance(m, FileMeta) for m in metas.values())
        found[asset] = len(metas)

    # Two folders sized at once share the one bound.
    async with trio.open_nursery() as nursery:
        for asset in ("A-1", "A-2"):
            nursery.start_soon(size_one, asset)
    assert found == {"A-1": len(many), "A-2": len(many)}
    assert fake.counts["files.getFileInfo"] == 2 * len(many)
    assert fake.peak["files.getFileInfo"] == META_CONCURRENCY


async def test_names_that_cannot_be_ids_cost_no_call() -> None:
    fake, _ = demo()
    catalog = Catalog(fake, settings(), clock=Clock())
    for name in (".git", "__pycache__", ".hidden", "a b", "..", "x/..", ""):
        assert not await catalog.has_asset(ORG, name), name
        assert await catalog.unlisted_file(ORG, "WTG-002", "feature", name) is None, name
    assert sum(fake.counts.values()) == 0


async def test_unlisted_lookups_by_id() -> None:
    fake, files = demo()
    uri = files["WTG-002/feature/manual.pdf"]
    name = uri.removeprefix("enos-connect://")
    catalog = Catalog(fake, settings(), clock=Clock())
    assert await catalog.has_asset(ORG, "WTG-002")
    assert not await catalog.has_asset(ORG, "no-such-asset")
    asked = fake.counts["devices.get"]
    assert not await catalog.has_asset(ORG, "../x")
    assert fake.counts["devices.get"] == asked  # not a name an asset can have: not asked
    entry = await catalog.unlisted_file(ORG, "WTG-002", "feature", name)
    assert entry is not None and (entry.wanted, entry.uri) == (name, uri)
    assert entry.meta is not None
    assert await catalog.unlisted_file(ORG, "WTG-002", "feature", "nothing.txt") is None
    assert await catalog.unlisted_file(ORG, "WTG-002", "feature", "..") is None


async def test_the_fake_and_the_real_client_agree_on_the_demo_org(emu: Emulator) -> None:
    """The fake is only worth its tests while it answers as the client does: on the
    emulator's demo organisation both give the catalog the same entries, sizes,
    digests, origins and times."""
    fake = FakeListings.from_emulator_state(emu.state(), emu.org)
    shown = 0

    def by_key(e: Entry) -> tuple[str, ...]:
        return e.key

    async with client_for(emu) as client:
        real = Catalog(client, emu.settings(), clock=Clock())
        twin = Catalog(fake, emu.settings(), clock=Clock())
        assets = await real.asset_ids(emu.org)
        assert assets == await twin.asset_ids(emu.org)
        for asset in assets:
            for category in ("feature", "ota"):
                # In key order: entries come in the server's order, and the tree sorts.
                entries = sorted(await real.entries(emu.org, asset, category), key=by_key)
                faked = sorted(await twin.entries(emu.org, asset, category), key=by_key)
                assert entries == faked, (asset, category)
                refs = [FileRef(emu.org, asset, category, e.uri) for e in entries]
                assert await real.sizes(refs) == await twin.sizes(refs), (asset, category)
                shown += len(entries)
    assert shown == len(demo_files(emu))
