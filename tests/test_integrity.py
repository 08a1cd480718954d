"""Whole-file checks of files too large to fetch whole before serving: a file read from
start to end is checked against EnOS's digest as it goes, a mismatch fails the read of
its last bytes, and no block of it is kept (in memory, on disk, in the kernel) after."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import Emulator, demo_files, known, md5, mounted, run, stats_of

pytestmark = pytest.mark.mount

BIG = "WTG-001/feature/vibration_raw.bin"
CORRUPT_ONCE = {"kind": "corrupt", "after": 5000, "times": 1, "match": "files.download"}


def wait_for(predicate: Callable[[], object], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def test_a_corrupted_large_file_fails_at_its_end_and_is_right_next_time(
    emu: Emulator, work: Path
) -> None:
    want = emu.blobs()[demo_files(emu)[BIG]]["md5"]
    with mounted(work, emu) as m:
        (m.org / BIG).stat()
        emu.faults(CORRUPT_ONCE)
        out = run("md5sum", m.org / BIG)
        assert out.returncode != 0, out.stdout
        assert "Input/output error" in out.stderr
        assert emu.fired().get("corrupt") == 1
        assert "do not match the md5" in m.log_text()
        # The bad bytes are gone from every cache: the next reading fetches and matches.
        assert md5(m.org / BIG) == want
        stats = stats_of(m.path)
        cache = stats["cache"]
        assert cache["integrity_failures"] == 1
        # Both readings were judged: the kernel's parallel reads did not break them.
        assert stats["whole_readings"]["broken"] == 0
        assert cache["verified_files"] >= 1


def test_a_large_file_read_whole_reaches_the_disk_cache_only_once_verified(
    emu: Emulator, work: Path
) -> None:
    want = emu.blobs()[demo_files(emu)[BIG]]["md5"]
    cache = work / "cache"
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        emu.faults(CORRUPT_ONCE)
        with pytest.raises(OSError) as info:
            md5(m.org / BIG)
        assert info.value.errno == errno.EIO
        # Nothing of the bad reading may be served from disk, now or after a remount.
        assert wait_for(lambda: stats_of(m.path)["cache"]["disk"]["blocks"] == 0)
        # A partial reading stages its blocks but never makes them servable.
        with open(m.org / BIG, "rb") as f:
            f.read(8 * 1024 * 1024)
    emu.reset_stats()
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        assert stats_of(m.path)["cache"]["disk"]["blocks"] == 0
        assert md5(m.org / BIG) == want
        assert emu.stats()["files.download"] > 0
        assert wait_for(lambda: stats_of(m.path)["cache"]["disk"]["blocks"] >= 200)
    emu.reset_stats()
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        assert md5(m.org / BIG) == want
        assert emu.stats().get("files.download", 0) == 0


def test_a_random_reader_of_a_large_file_is_not_held_up_by_checks(
    emu: Emulator, work: Path
) -> None:
    blob = emu.blob(demo_files(emu)[BIG])
    with mounted(work, emu) as m, open(m.org / BIG, "rb") as f:
        # The end first (as unzip reads a zip), then the middle: no whole reading,
        # no claim, and the bytes are right.
        f.seek(len(blob) - 4096)
        assert f.read() == blob[-4096:]
        f.seek(len(blob) // 2)
        assert f.read(65536) == blob[len(blob) // 2 : len(blob) // 2 + 65536]
        assert stats_of(m.path)["cache"]["integrity_failures"] == 0


def test_bad_bytes_from_a_partial_read_are_caught_by_the_next_whole_read(
    emu: Emulator, work: Path
) -> None:
    want = emu.blobs()[demo_files(emu)[BIG]]["md5"]
    with mounted(work, emu) as m:
        known(m.org / BIG)
        emu.faults(CORRUPT_ONCE)
        # A partial read cannot be checked: its bad bytes stay in the memory cache (a
        # second open file keeps a lone reader from letting its blocks go) and in the
        # kernel's page cache...
        with open(m.org / BIG, "rb") as f, open(m.org / BIG, "rb"):
            head = f.read(1024 * 1024)
        assert head != emu.blob(demo_files(emu)[BIG])[: len(head)]
        # ...but a whole reading that follows goes through the check, not around it.
        out = run("md5sum", m.org / BIG)
        assert out.returncode != 0 and "Input/output error" in out.stderr, out.stdout
        assert md5(m.org / BIG) == want


def test_once_a_large_file_matched_every_later_fetch_of_it_is_checked(
    emu: Emulator, work: Path
) -> None:
    uri = demo_files(emu)[BIG]
    blob = emu.blob(uri)
    with mounted(work, emu, '[cache]\nmemory = "16MiB"\n') as m:
        assert md5(m.org / BIG) == emu.blobs()[uri]["md5"]
        fd = os.open(m.org / BIG, os.O_RDONLY)
        try:
            # Long gone from a 16 MiB cache; out of the kernel's cache too.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            # A bad copy is refused and fetched again: the reader gets the right bytes.
            emu.faults(CORRUPT_ONCE)
            offset = 100 * 1024 * 1024
            assert os.pread(fd, 65536, offset) == blob[offset : offset + 65536]
            assert stats_of(m.path)["cache"]["bad_blocks"] == 1
            # Bad three times: fetched again until a good copy comes.
            emu.faults({**CORRUPT_ONCE, "times": 3})
            offset = 120 * 1024 * 1024
            assert os.pread(fd, 65536, offset) == blob[offset : offset + 65536]
            assert stats_of(m.path)["cache"]["bad_blocks"] == 4
            # Bad every time (four copies): the read fails rather than serve it.
            emu.faults({**CORRUPT_ONCE, "times": 4})
            offset = 150 * 1024 * 1024
            with pytest.raises(OSError) as info:
                os.pread(fd, 65536, offset)
            assert info.value.errno == errno.EIO
            assert stats_of(m.path)["cache"]["bad_blocks"] == 8
            time.sleep(1.1)  # past the failure memory
            assert os.pread(fd, 65536, offset) == blob[offset : offset + 65536]
        finally:
            os.close(fd)
