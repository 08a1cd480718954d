"""Layer 5: listing and metadata through a real mount, where the kernel is part of the
behaviour (readdirplus hands it attributes, lookups may be answered by negative
entries), counted at the emulator: `find` asks no size, `ls -l` and `stat` see true
sizes, and absent names cost EnOS at most one call per negative TTL."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.support import Emulator, demo_files, mounted, run, stats_of, wait_for

NEGATIVE = '[cache]\nnegative_ttl = "2s"\n'


def calls(emu: Emulator) -> dict[str, int]:
    """API calls by kind (not the connections, which the test's own admin calls open)."""
    return {k: v for k, v in emu.stats().items() if k != "connections"}


@pytest.mark.mount
def test_find_lists_every_file_and_asks_no_size(emu: Emulator, work: Path) -> None:
    files = demo_files(emu)
    with mounted(work, emu) as m:
        emu.reset_stats()
        out = run("find", m.org, "-type", "f")
        assert out.returncode == 0, out.stderr
        found = {str(Path(p).relative_to(m.org)) for p in out.stdout.split()}
        assert found == set(files)
        assert emu.stats().get("files.getFileInfo", 0) == 0


@pytest.mark.mount
def test_ls_l_and_stat_after_a_listing_show_true_sizes(emu: Emulator, work: Path) -> None:
    files = demo_files(emu)
    blobs = emu.blobs()
    with mounted(work, emu) as m:
        folder = m.org / "WTG-001" / "feature"
        want = {
            rel.rsplit("/", 1)[1]: blobs[uri]["size"]
            for rel, uri in files.items()
            if rel.startswith("WTG-001/feature/")
        }
        # Listed (the kernel is handed every entry, unsized), then stat'ed: the size
        # is true, not the 0 of a size not asked yet.
        assert sorted(os.listdir(folder)) == sorted(want)
        emu.reset_stats()
        first = min(want)
        assert (folder / first).stat().st_size == want[first]
        # That one stat sized the folder: `ls -l` right after asks nothing more.
        assert emu.stats().get("files.getFileInfo", 0) == len(want)
        out = run("ls", "-ln", folder)
        assert out.returncode == 0, out.stderr
        shown = {line.split()[-1]: int(line.split()[4]) for line in out.stdout.splitlines()[1:]}
        assert shown == want
        assert emu.stats().get("files.getFileInfo", 0) == len(want)
        # And a folder `ls -l` is the first to ask about: the same true sizes.
        other = m.org / "WTG-002" / "feature"
        out = run("ls", "-ln", other)
        assert out.returncode == 0, out.stderr
        for line in out.stdout.splitlines()[1:]:
            name, size = line.split()[-1], int(line.split()[4])
            assert size == blobs[files[f"WTG-002/feature/{name}"]]["size"], name
        for rel, uri in files.items():
            assert (m.org / rel).stat().st_size == blobs[uri]["size"], rel


@pytest.mark.mount
def test_absent_names_cost_one_call_per_negative_ttl(emu: Emulator, work: Path) -> None:
    with mounted(work, emu, NEGATIVE) as m:
        feature = m.org / "WTG-001" / "feature"
        os.listdir(feature)
        emu.reset_stats()
        errors = stats_of(m.path)["errors"].get("ENOENT", 0)
        for _ in range(3):
            for path in (m.org / "foo.so", feature / "foo.so"):
                assert not path.exists()
        asked = calls(emu)
        assert asked.get("devices.get", 0) == 1
        assert asked.get("files.getFileInfo", 0) == 1
        # The kernel kept the negative entries: enosfs answered each name once.
        assert stats_of(m.path)["errors"].get("ENOENT", 0) == errors + 2
        # Names no asset or file can have: no call at all.
        for name in (".git", "__pycache__", ".hidden", "a b"):
            for d in (m.org, m.org / "WTG-001", feature):
                assert not (d / name).exists()
        assert calls(emu) == asked
        # Past the negative TTL, asked again.
        time.sleep(2.2)
        assert not (m.org / "foo.so").exists()
        wait_for(lambda: emu.stats().get("devices.get", 0) == 2, "the name asked again")
