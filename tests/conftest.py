from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Emulator, emulator


def pytest_sessionstart(session: pytest.Session) -> None:
    # Mount tests need the kernel side; missing it is a broken machine, not a skip.
    missing = [p for p in ("/dev/fuse",) if not os.path.exists(p)]
    if not shutil.which("fusermount3"):
        missing.append("fusermount3")
    if missing:
        raise pytest.UsageError(
            f"FUSE is not usable here (missing {', '.join(missing)}); "
            "run scripts/test, which installs fuse3"
        )


@pytest.fixture(scope="session")
def demo_emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """The demo organisation, served once for the whole session. Tests must not change
    its data; they may reset its counters."""
    data = tmp_path_factory.mktemp("demo-data")
    with emulator(data) as emu:
        yield emu


@pytest.fixture
def emu(demo_emu: Emulator) -> Iterator[Emulator]:
    """The shared emulator with clean counters, and switches put back after the test."""
    demo_emu.reset_stats()
    before = demo_emu.admin("GET", "switches")
    yield demo_emu
    demo_emu.admin("DELETE", "faults")
    demo_emu.switches(**before)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path
