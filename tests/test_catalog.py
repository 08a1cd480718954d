"""Layers 1-2: the catalog (what EnOS says exists) against the emulator, with a clock of
the test's own so that TTLs pass without waiting."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from enosfs.catalog import Catalog
from enosfs.expiring import Expiring
from tests.support import Emulator, demo_files
from tests.test_client import client_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def catalog_for(emu: Emulator, clock: Clock) -> AsyncIterator[Catalog]:
    async with client_for(emu) as client:
        yield Catalog(client, emu.settings(), clock=clock)


def expected(emu: Emulator, asset: str, category: str) -> dict[str, str]:
    """File name -> fileUri that the listing of one category must show."""
    prefix = f"{asset}/{category}/"
    return {
        rel.removeprefix(prefix): uri
        for rel, uri in demo_files(emu).items()
        if rel.startswith(prefix)
    }


def test_expiring_answers_fresh_until_ttl_then_only_last() -> None:
    clock = Clock()
    cache: Expiring[str, list[int]] = Expiring(10.0, clock)
    assert cache.fresh("a") is None and cache.last("a") is None
    cache.put("a", [])
    assert cache.fresh("a") == []  # an empty answer is an answer
    clock.now += 10.0
    assert cache.fresh("a") is None
    assert cache.last("a") == []


async def test_entries_of_both_categories_are_found_and_sized(emu: Emulator) -> None:
    blobs = emu.blobs()
    async with catalog_for(emu, Clock()) as catalog:
        assert "WTG-002" in await catalog.asset_ids(emu.org)
        for category in ("feature", "ota"):
            want = expected(emu, "WTG-002", category)
            assert want, category
            entries = await catalog.entries(emu.org, "WTG-002", category)
            assert {e.wanted: e.uri for e in entries} == want
            for e in entries:
                assert e.meta is not None and e.meta.size == blobs[e.uri]["size"]
                assert e.origin["uri"] == e.uri


async def test_device_model_and_known_sizes_are_asked_once_per_ttl(emu: Emulator) -> None:
    clock = Clock()
    async with catalog_for(emu, clock) as catalog:
        first = await catalog.entries(emu.org, "WTG-002", "feature")
        asked = emu.stats()
        metas = {e.uri: e.meta for e in first}
        again = await catalog.entries(emu.org, "WTG-002", "feature", known=metas.get)
        assert [e.uri for e in again] == [e.uri for e in first]
        # Device and model are fresh and the sizes known: only the latest values are
        # asked again, as they are what changes.
        now = emu.stats()
        for kind in ("devices.get", "thing-models.get", "files.getFileInfo"):
            assert now.get(kind) == asked.get(kind), kind
        assert now["measurepoints.queryLatest"] == asked["measurepoints.queryLatest"] + 1
        clock.now += emu.settings().metadata_ttl
        await catalog.entries(emu.org, "WTG-002", "feature", known=metas.get)
        later = emu.stats()
        assert later["devices.get"] == asked.get("devices.get", 0) + 1
        assert later["thing-models.get"] == asked.get("thing-models.get", 0) + 1
        assert later.get("files.getFileInfo") == asked.get("files.getFileInfo")


@pytest.mark.allow_warnings(r"not permitted")
async def test_denied_device_details_keep_the_last_answer_and_say_so_once(
    emu: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    want = expected(emu, "WTG-002", "feature")
    async with catalog_for(emu, clock) as catalog:
        await catalog.entries(emu.org, "WTG-002", "feature")
        emu.faults({"kind": "deny", "match": "devices.get"})
        with caplog.at_level(logging.WARNING, logger="enosfs.catalog"):
            for _ in range(2):
                clock.now += emu.settings().metadata_ttl
                entries = await catalog.entries(emu.org, "WTG-002", "feature")
                assert {e.wanted: e.uri for e in entries} == want
        said = [r for r in caplog.records if "not permitted" in r.getMessage()]
        assert len(said) == 1, said
        # Naming an asset no listing shows needs its details: denied, it is not there.
        assert not await catalog.has_asset(emu.org, "WTG-001")


async def test_unlisted_lookups_by_id(emu: Emulator) -> None:
    uri = demo_files(emu)["WTG-002/feature/model_file.json"]
    name = uri.removeprefix("enos-connect://")
    async with catalog_for(emu, Clock()) as catalog:
        assert await catalog.has_asset(emu.org, "WTG-002")
        assert not await catalog.has_asset(emu.org, "no-such-asset")
        assert not await catalog.has_asset(emu.org, "../x")
        entry = await catalog.unlisted_file(emu.org, "WTG-002", "feature", name)
        assert entry is not None and (entry.wanted, entry.uri) == (name, uri)
        assert entry.meta is not None
        assert await catalog.unlisted_file(emu.org, "WTG-002", "feature", "nothing.txt") is None
        assert await catalog.unlisted_file(emu.org, "WTG-002", "feature", "..") is None
