"""The metadata store on its own: what goes in comes out, and damage is never trusted."""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from enosfs import metastore
from enosfs.api import FileMeta
from enosfs.catalog import Entry
from enosfs.metastore import FILE_NAME, MetaFile, MetaStore, OrgRecord, Stored

PLACE = ("o1", "a1", "feature")


def meta(uri: str, size: int = 10, md5: str | None = "0" * 32) -> FileMeta:
    return FileMeta(
        uri=uri,
        size=size,
        md5=md5,
        original_name="r.txt",
        create_time_ms=1_700_000_000_000,
        sign_method="md5",
        sign=md5,
        etag=None,
    )


def entries() -> list[Entry]:
    return [
        Entry(
            "a_report.txt",
            ("0", "report"),
            "enos-connect://aa.txt",
            meta("enos-connect://aa.txt"),
            {"uri": "enos-connect://aa.txt", "feature": "report"},
            1_700_000_000_000,
        ),
        Entry("fw_1.0.bin", ("0", "fw", "1.0", "f1"), "enos-connect://bb", None, {}, None),
    ]


async def opened(folder: Path) -> MetaStore:
    store = await MetaStore.open(folder)
    assert store is not None
    return store


async def test_every_record_kind_comes_back_as_it_was_saved(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    store.save_assets("o1", ["a1", "a2"], fetched=1000.0)
    store.save_listing(PLACE, entries(), fetched=1001.0)
    store.save_meta(PLACE, meta("enos-connect://aa.txt", size=5), fetched=1002.5)
    store.save_meta(PLACE, meta("enos-connect://bb", md5=None), fetched=1003.0)
    store.save_assets("o2", ["x"], fetched=7.0)
    await store.close()

    store = await opened(tmp_path)
    got = await store.load("o1")
    await store.close()
    assert got.assets is not None
    assert (got.assets.value, got.assets.fetched) == (["a1", "a2"], 1000.0)
    listing = got.listings[("a1", "feature")]
    assert (listing.value, listing.fetched) == (entries(), 1001.0)
    assert isinstance(listing.value[0].key, tuple)
    assert got.metas[("a1", "feature", "enos-connect://aa.txt")].value == meta(
        "enos-connect://aa.txt", size=5
    )
    assert got.metas[("a1", "feature", "enos-connect://bb")].fetched == 1003.0
    assert len(got.metas) == 2
    assert store.counts["loaded"] == 4


async def test_a_later_save_replaces_an_earlier_one(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    store.save_meta(PLACE, meta("enos-connect://aa.txt", size=1), fetched=1.0)
    await store.flush()
    store.save_meta(PLACE, meta("enos-connect://aa.txt", size=2), fetched=2.0)
    store.save_meta(PLACE, meta("enos-connect://aa.txt", size=3), fetched=3.0)
    await store.flush()
    got = await store.load("o1")
    await store.close()
    stored = got.metas[("a1", "feature", "enos-connect://aa.txt")]
    assert (stored.value.size, stored.fetched) == (3, 3.0)


async def test_what_an_org_or_a_folder_no_longer_lists_is_dropped(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    store.save_assets("o1", ["a1", "a2"])
    for asset in ("a1", "a2"):
        store.save_listing(("o1", asset, "feature"), entries())
        store.save_meta(("o1", asset, "feature"), meta("enos-connect://aa.txt"))
        store.save_meta(("o1", asset, "feature"), meta("enos-connect://gone.txt"))
    store.save_listing(("o2", "a2", "ota"), entries())
    await store.flush()
    assert store.file is not None
    assert store.file.counts() == {"assets": 1, "listings": 3, "metas": 4}

    store.save_assets("o1", ["a1"])  # a2 left the org
    store.save_listing(("o1", "a1", "feature"), entries())  # gone.txt left the folder
    await store.flush()
    got = await store.load("o1")
    assert store.file.counts() == {"assets": 1, "listings": 2, "metas": 1}
    await store.close()
    assert set(got.listings) == {("a1", "feature")}
    assert set(got.metas) == {("a1", "feature", "enos-connect://aa.txt")}


async def test_a_forget_drops_its_subtree_and_nothing_else(tmp_path: Path) -> None:
    """`enosfs refresh` of a file, an asset, an org, everything; the records saved
    before a forget in the same batch go with it."""
    other = ("o1", "a2", "feature")
    store = await opened(tmp_path)
    store.save_assets("o1", ["a1", "a2"], fetched=1000.0)
    store.save_assets("o2", ["x"], fetched=1000.0)
    for place in (PLACE, other):
        store.save_listing(place, entries(), fetched=1000.0)
        store.save_meta(place, meta("enos-connect://aa.txt"), fetched=1000.0)
        store.save_meta(place, meta("enos-connect://bb"), fetched=1000.0)
    # A file: its record and its folder's listing; its sibling's record stays.
    store.forget((*PLACE, "enos-connect://aa.txt"))
    await store.flush()
    got = await store.load("o1")
    assert got.assets is not None and set(got.listings) == {("a2", "feature")}
    assert set(got.metas) == {
        ("a1", "feature", "enos-connect://bb"),
        ("a2", "feature", "enos-connect://aa.txt"),
        ("a2", "feature", "enos-connect://bb"),
    }

    store.forget(("o1", "a2"))
    await store.flush()
    got = await store.load("o1")
    assert got.assets is not None and got.listings == {}
    assert set(got.metas) == {("a1", "feature", "enos-connect://bb")}

    store.forget(("o1",))
    await store.flush()
    got = await store.load("o1")
    assert (got.assets, got.listings, got.metas) == (None, {}, {})
    assert (await store.load("o2")).assets is not None

    store.forget(())
    await store.flush()
    assert store.file is not None
    assert store.file.counts() == {"assets": 0, "listings": 0, "metas": 0}
    await store.close()


async def test_the_writer_task_saves_in_batches(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for i in range(500):
            store.save_meta(PLACE, meta(f"enos-connect://{i}"))
        await trio.sleep(metastore.BATCH_DELAY * 3)
        nursery.cancel_scope.cancel()
    assert store.counts["written"] == 500
    assert store.counts["batches"] < 5
    await store.close()


async def test_many_tasks_and_two_connections_writing_at_once_leave_a_sound_store(
    tmp_path: Path,
) -> None:
    """Trio tasks through one store, and meanwhile a thread through a second connection
    (as a crashed mount's leftover would be): every record lands and the check holds."""
    store = await opened(tmp_path)
    other = MetaFile.open(tmp_path)
    assert other is not None

    def thread_writer() -> None:
        for i in range(50):
            batch = [("meta", ("o1", "t", "ota"), meta(f"enos-connect://t{i}.{j}"), 1.0)
                     for j in range(20)]  # fmt: skip
            other.write(batch)

    async def task_writer(n: int) -> None:
        for i in range(100):
            store.save_meta(("o1", f"a{n}", "feature"), meta(f"enos-connect://{n}.{i}"))
            if i % 10 == 0:
                await store.flush()
            await trio.sleep(0)

    thread = threading.Thread(target=thread_writer)
    thread.start()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        async with trio.open_nursery() as writers:
            for n in range(8):
                writers.start_soon(task_writer, n)
        await store.flush()
        nursery.cancel_scope.cancel()
    await trio.to_thread.run_sync(thread.join)
    other.close()
    assert store.counts["failed"] == 0
    await store.close()

    check = sqlite3.connect(tmp_path / FILE_NAME)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert check.execute("SELECT count(*) FROM metas").fetchone()[0] == 8 * 100 + 50 * 20
    check.close()


async def test_twenty_thousand_file_records_load_at_once(tmp_path: Path) -> None:
    """The size of a 5,000-device org: saved as a walk would, then loaded in bulk.
    How long it takes is printed, not asserted (speed is for scripts/bench)."""
    store = await opened(tmp_path)
    assets = [f"asset{i:05d}" for i in range(5000)]
    store.save_assets("big", assets)
    for asset in assets:
        listed = [
            Entry(f"f{j}.bin", ("0", f"f{j}"), f"enos-connect://{asset}.{j}", None, {}, None)
            for j in range(4)
        ]
        store.save_listing(("big", asset, "feature"), listed)
        for e in listed:
            store.save_meta(("big", asset, "feature"), meta(e.uri))
    await store.flush()
    await store.close()

    store = await opened(tmp_path)
    started = time.perf_counter()
    got = await store.load("big")
    took = time.perf_counter() - started
    await store.close()
    print(f"loaded 5,000 listings and 20,000 file records in {took:.3f}s")
    assert len(got.listings) == 5000
    assert len(got.metas) == 20_000


def test_a_record_from_the_future_is_never_fresh() -> None:
    assert Stored("x", 100.0).age(now=130.0) == 30.0
    assert Stored("x", 100.0).age(now=99.0) == float("inf")


_WRITE_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from enosfs.api import FileMeta
from enosfs.metastore import MetaFile
f = MetaFile.open(Path(sys.argv[1]))
i = 0
while True:
    batch = [("meta", ("o1", "a1", "ota"), FileMeta(f"enos-connect://{i}.{j}", j), time.time())
             for j in range(200)]
    f.write(batch)
    i += 1
    if i == 3:
        print("written", flush=True)
"""


def test_a_writer_killed_mid_batch_leaves_what_it_committed(tmp_path: Path) -> None:
    """kill -9 while batches are being written: the next open finds a sound store (no
    warning, nothing started afresh) holding whole batches only."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITE_UNTIL_KILLED, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "written\n"
        time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    file = MetaFile.open(tmp_path)
    assert file is not None
    rows = file.counts()["metas"]
    file.close()
    assert rows >= 3 * 200 and rows % 200 == 0
    assert not (tmp_path / (FILE_NAME + metastore.DAMAGED_SUFFIX)).exists()


# -- damage ----------------------------------------------------------------------------------


async def filled(folder: Path) -> Path:
    store = await opened(folder)
    store.save_assets("o1", ["a1"])
    store.save_listing(PLACE, entries())
    for i in range(300):  # a few pages, so that half the file is not all of it
        store.save_meta(PLACE, meta(f"enos-connect://{i}"))
    await store.close()
    return folder / FILE_NAME


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def truncated(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def scribbled(path: Path) -> None:
    """A torn write in the middle of the file: a page of it overwritten by zeros."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\0" * 4096)


def other_layout(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()


def not_ours(path: Path) -> None:
    path.unlink()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()


@pytest.mark.allow_warnings(r"metadata store .* was damaged .*; starting afresh")
@pytest.mark.parametrize("damage", [garbage, truncated, scribbled, other_layout, not_ours])
async def test_a_damaged_store_is_started_afresh_never_trusted(
    tmp_path: Path, damage: object, caplog: pytest.LogCaptureFixture
) -> None:
    path = await filled(tmp_path)
    assert callable(damage)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="enosfs.metastore"):
        store = await opened(tmp_path)
    said = [r for r in caplog.records if r.name == "enosfs.metastore"]
    assert len(said) == 1 and "starting afresh" in said[0].getMessage()
    assert (tmp_path / (FILE_NAME + metastore.DAMAGED_SUFFIX)).exists()
    assert await store.load("o1") == OrgRecord()
    # And the new one works.
    store.save_assets("o1", ["a9"])
    await store.close()
    store = await opened(tmp_path)
    got = await store.load("o1")
    await store.close()
    assert got.assets is not None and got.assets.value == ["a9"]


@pytest.mark.allow_warnings(r"metadata store: 2 records of o1 unreadable")
async def test_a_record_that_does_not_read_back_is_left_out(tmp_path: Path) -> None:
    path = await filled(tmp_path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE metas SET size = -1 WHERE uri = 'enos-connect://7'")
    conn.execute("UPDATE metas SET size = 'big' WHERE uri = 'enos-connect://8'")
    conn.commit()
    conn.close()
    store = await opened(tmp_path)
    got = await store.load("o1")
    await store.close()
    assert ("a1", "feature", "enos-connect://7") not in got.metas
    assert ("a1", "feature", "enos-connect://8") not in got.metas
    assert len(got.metas) == 298
    assert store.counts["unreadable"] == 2


async def test_the_layout_follows_file_meta(tmp_path: Path) -> None:
    """A field added to FileMeta needs a column and a new SCHEMA_VERSION (so older
    stores are started afresh, not misread): this fails until both are done."""
    path = await filled(tmp_path)
    conn = sqlite3.connect(path)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(metas)")]
    conn.close()
    fields = [f.name for f in dataclasses.fields(FileMeta)]
    assert columns == ["org", "asset", "category", *fields, "fetched"]


@pytest.mark.allow_warnings(r"metadata store: writing failed .*not kept for the rest")
async def test_a_failure_in_use_turns_the_store_off_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await opened(tmp_path)
    assert store.file is not None
    store.file.conn.execute("DROP TABLE metas")  # as a disk that started failing would
    store.save_meta(PLACE, meta("enos-connect://aa.txt"))
    with caplog.at_level(logging.WARNING, logger="enosfs.metastore"):
        await store.flush()
        store.save_meta(PLACE, meta("enos-connect://bb"))
        await store.flush()
    assert not store.enabled
    assert len([r for r in caplog.records if r.name == "enosfs.metastore"]) == 1
    assert await store.load("o1") == OrgRecord()
    await store.close()


@pytest.mark.allow_warnings(r"metadata store .* cannot be made .*; metadata is not kept")
async def test_no_folder_to_make_it_in_means_no_store(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    assert await MetaStore.open(tmp_path / "file" / "cache") is None
