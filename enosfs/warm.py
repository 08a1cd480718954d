"""`enosfs warm`: walk a subtree of a mount ahead of its users, so its metadata is held.

Listing a folder and stat-ing its entries is what makes a mount ask EnOS for listings
and sizes, so the walk is nothing more, done from a few threads at once: the mount
answers them concurrently (within its own bounds towards EnOS), where one `find` asks
one thing at a time. Afterwards `ls -lR`, `find` or an IDE over the subtree is answered
from what the mount holds, until `cache.metadata_ttl` passes.

A failed entry is counted and the walk goes on; Ctrl-C stops it with one line.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from enosfs.namespace import CONTROL_DIR

PROGRESS_TTY = 0.2  # seconds between redraws of the progress line on a terminal
PROGRESS_LOG = 5.0  # seconds between progress lines elsewhere
ERRORS_SHOWN = 5


@dataclass
class Tally:
    folders: int = 0
    files: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    def line(self, seconds: float) -> str:
        return (
            f"{self.folders} folders, {self.files} files, {self.error_count} errors, {seconds:.1f}s"
        )


class Walk:
    """The walk of one subtree by `jobs` threads sharing a queue of folders."""

    def __init__(self, root: str, jobs: int, *, skip_control: bool) -> None:
        self.root = root
        self.jobs = jobs
        self.skip_control = skip_control
        self.tally = Tally()
        self._lock = threading.Lock()
        self._folders: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._pending = 0  # folders queued or being walked
        self.done = threading.Event()

    def start(self) -> None:
        self._queue(self.root)
        for _ in range(self.jobs):
            # Daemon threads: an interrupted walk must not wait for a stat in flight.
            threading.Thread(target=self._work, daemon=True).start()

    def _queue(self, folder: str) -> None:
        with self._lock:
            self._pending += 1
        self._folders.put(folder)

    def _failed(self, path: str, exc: OSError) -> None:
        with self._lock:
            self.tally.error_count += 1
            if len(self.tally.errors) < ERRORS_SHOWN:
                self.tally.errors.append(f"{path}: {exc.strerror or exc}")

    def _work(self) -> None:
        while (folder := self._folders.get()) is not None:
            try:
                self._walk_one(folder)
            finally:
                with self._lock:
                    self._pending -= 1
                    last = self._pending == 0
                if last:
                    self.done.set()
                    for _ in range(self.jobs):
                        self._folders.put(None)

    def _walk_one(self, folder: str) -> None:
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            self._failed(folder, exc)
            return
        with self._lock:
            self.tally.folders += 1
        top = self.skip_control and folder == self.root
        for entry in entries:
            if top and entry.name == CONTROL_DIR:
                continue
            if entry.is_symlink():
                continue  # by-name/, by-key/: they name folders walked by their own name
            try:
                # The stat is what has the mount fetch the entry's metadata.
                is_dir = entry.is_dir(follow_symlinks=False)
                entry.stat(follow_symlinks=False)
            except OSError as exc:
                self._failed(entry.path, exc)
                continue
            if is_dir:
                self._queue(entry.path)
            else:
                with self._lock:
                    self.tally.files += 1


def warm(
    root: str,
    shown: str,
    *,
    jobs: int,
    at_mount_root: bool,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Walk `root` (named `shown` to the user); 0 when every entry answered, 1 when
    some failed, 130 when interrupted."""
    started = time.monotonic()
    walk = Walk(root, jobs, skip_control=at_mount_root)
    tty = err.isatty()
    every = PROGRESS_TTY if tty else PROGRESS_LOG
    try:
        walk.start()
        while not walk.done.wait(every):
            line = f"warming {shown}: {walk.tally.line(time.monotonic() - started)}"
            if tty:
                err.write("\r\x1b[K" + line)
                err.flush()
            else:
                print(line, file=err, flush=True)
    except KeyboardInterrupt:
        if tty:
            err.write("\r\x1b[K")
        took = time.monotonic() - started
        print(f"enosfs: warm of {shown} interrupted: {walk.tally.line(took)}", file=err)
        return 130
    if tty:
        err.write("\r\x1b[K")
        err.flush()
    took = time.monotonic() - started
    t = walk.tally
    for text in t.errors:
        print(f"enosfs: warm: {text}", file=err)
    if t.error_count > len(t.errors):
        print(f"enosfs: warm: ... and {t.error_count - len(t.errors)} more errors", file=err)
    print(
        f"warmed {shown}: {t.folders} folders, {t.files} files in {took:.1f}s, "
        f"{t.error_count} errors",
        file=out,
        flush=True,
    )
    return 1 if t.error_count else 0
