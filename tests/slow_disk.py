"""A slow disk under a mount's disk cache, for a mount in a child process: each block
write waits before it starts. enosfs has no switch for this; the child installs it at
start-up from a sitecustomize that `python_path()` writes, found on PYTHONPATH."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def install(seconds: float) -> None:
    """Make every DiskCache write wait `seconds` first (cancellably, as trio waits)."""
    import trio

    from enosfs.diskcache import DiskCache

    put = DiskCache._put

    async def slow_put(self: DiskCache, key: str, data: bytearray, *, staged: bool = False) -> None:
        await trio.sleep(seconds)
        await put(self, key, data, staged=staged)

    DiskCache._put = slow_put  # type: ignore[method-assign]


def python_path(where: Path, seconds: float) -> str:
    """A PYTHONPATH under which a Python process starts with slow disk-cache writes."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "sitecustomize.py").write_text(
        f"from tests.slow_disk import install\n\ninstall({seconds!r})\n"
    )
    return os.pathsep.join(p for p in (str(where), str(ROOT), os.environ.get("PYTHONPATH")) if p)
