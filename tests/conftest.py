from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Emulator, emulator


def _fuse_missing() -> list[str]:
    missing = [p for p in ("/dev/fuse",) if not os.path.exists(p)]
    if not shutil.which("fusermount3"):
        missing.append("fusermount3")
    return missing


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `mount` fails (never skips) where FUSE is not usable: a mount test
    that cannot run is a broken machine, and a skip would hide it in a green run. The
    tests that need no kernel (units, the block cache on its fake source, the client
    against the emulator) still run there. scripts/test checks /dev/fuse itself."""
    if item.get_closest_marker("mount") is None:
        return
    missing = _fuse_missing()
    if missing:
        pytest.fail(
            f"this test mounts, and FUSE is not usable here (missing {', '.join(missing)}); "
            "run scripts/test, which installs fuse3",
            pytrace=False,
        )


class _Collector(logging.Handler):
    """Keeps every record at WARNING or above that reaches the root logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_unexpected_warnings(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that logs a WARNING or ERROR it did not declare.

    A warning is enosfs telling its user something went wrong; a test that causes one
    by accident hides a bug, or a message that became noise. A test that means to cause
    one says so: ``@pytest.mark.allow_warnings(r"regex", ...)`` allows records whose
    message matches one of the patterns (``re.search``), and the bare marker allows any.

    Only records logged through Python logging in this pytest process are seen: the
    in-process tests (test_blocks.py, test_client.py, test_fs_ops.py, test_units.py, ...).
    A mount or an emulator runs in a subprocess whose log is out of reach here; tests of
    those check their output themselves where it matters. A logger that does not
    propagate to the root logger is out of reach too.
    """
    collector = _Collector()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield
    finally:
        root.removeHandler(collector)
    patterns: list[str] = []
    allow_any = False
    for marker in request.node.iter_markers("allow_warnings"):
        patterns.extend(marker.args)
        allow_any = allow_any or not marker.args
    if allow_any:
        return
    unexpected = [
        r for r in collector.records if not any(re.search(p, r.getMessage()) for p in patterns)
    ]
    if unexpected:
        lines = "\n".join(f"  {r.levelname} {r.name}: {r.getMessage()}" for r in unexpected)
        pytest.fail(
            f"logged {len(unexpected)} unexpected warning(s); fix the cause, or mark the "
            f"test @pytest.mark.allow_warnings(pattern):\n{lines}",
            pytrace=False,
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
