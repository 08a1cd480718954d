"""`enosfs verify`: check files or trees on a mount against the md5 or sign EnOS gives.

It reads every byte through the mount (out of the kernel's page cache first, so the
check is end to end) and compares with the digest in the file's user.enos.* xattrs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from enosfs.namespace import CONTROL_DIR

CHUNK = 1024 * 1024


@dataclass
class Tally:
    ok: int = 0
    mismatched: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    no_digest: int = 0
    bytes: int = 0


def expected_digest(path: Path) -> tuple[str, str] | None:
    def xattr(name: str) -> str | None:
        try:
            return os.getxattr(path, name).decode()
        except OSError:
            return None

    md5 = xattr("user.enos.md5")
    if md5:
        return ("md5", md5.lower())
    method, sign = xattr("user.enos.sign_method"), xattr("user.enos.sign")
    if method in ("md5", "sha256") and sign:
        return (method, sign.lower())
    return None


def walk(paths: list[str]) -> Iterator[Path]:
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if d != CONTROL_DIR)
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield p


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """A status line on a terminal (bytes, rate, ETA); nothing otherwise."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.start = time.monotonic()
        self.last = 0.0

    def show(self, done: int, name: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.tty or (not force and now - self.last < 0.2):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6)
        eta = (self.total - done) / rate if rate > 0 else 0
        pct = 100 * done / self.total if self.total else 100
        line = (
            f"{pct:5.1f}%  {human(done)} of {human(self.total)}  {human(rate)}/s  "
            f"ETA {eta:.0f}s  {name}"
        )
        self.out.write("\r" + line[:120].ljust(120))
        self.out.flush()

    def clear(self) -> None:
        if self.tty:
            self.out.write("\r" + " " * 120 + "\r")
            self.out.flush()


def verify(paths: list[str], out: TextIO = sys.stdout) -> int:
    files = list(walk(paths))
    total = 0
    for f in files:
        with contextlib.suppress(OSError):
            total += f.stat().st_size
    tally = Tally()
    progress = Progress(total, sys.stderr)

    def say(text: str) -> None:
        progress.clear()
        print(text, file=out, flush=True)

    for f in files:
        want = expected_digest(f)
        if want is None:
            tally.no_digest += 1
            say(f"SKIP      {f} (EnOS gives no digest for it)")
            continue
        h = hashlib.new(want[0])
        try:
            with open(f, "rb", buffering=0) as fh:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    tally.bytes += len(chunk)
                    progress.show(tally.bytes, f.name)
        except OSError as exc:
            tally.errors.append(str(f))
            say(f"ERROR     {f}: {exc.strerror or exc}")
            continue
        got = h.hexdigest()
        if got == want[1]:
            tally.ok += 1
            if not progress.tty:
                say(f"OK        {f}")
        else:
            tally.mismatched.append(str(f))
            say(f"MISMATCH  {f} ({want[0]}: EnOS says {want[1]}, the bytes give {got})")
    progress.clear()
    elapsed = time.monotonic() - progress.start
    print(
        f"verified {tally.ok + len(tally.mismatched)} files, {human(tally.bytes)} in "
        f"{elapsed:.1f}s: {tally.ok} ok, {len(tally.mismatched)} mismatched, "
        f"{len(tally.errors)} unreadable, {tally.no_digest} without a digest",
        file=out,
    )
    return 0 if not tally.mismatched and not tally.errors else 1
