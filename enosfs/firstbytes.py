"""A file's first bytes asked for when its name is looked up, beside its size.

Opening a file nobody has looked at yet costs round trips in series: the kernel looks
the name up and wants its size (getFileInfo, a round trip), then opens it and reads
(the download, another one). The two do not depend on each other: the download needs
only the fileUri, which the listing gave. So a lookup that names one file (`cat`,
`open()` in a script, a flasher given a path) also sends a download of the file's
first bytes; the answer's head and first bytes come back while the size is on its
way, and the first read takes them instead of asking. Far from EnOS that is the
difference between two round trips and three before the first byte.

The body is held open, unread: nothing is copied, and bytes past what the socket
buffers wait on the server. The first fetch from byte 0 of that file (blocks.py,
through `EnosClient.open_download`) is given the body; if it wants more than the body
holds, it resumes from where the body ends, as after any short body, and the checks
(version, ETag, digest) are the block cache's as for any body. A body nobody takes
within KEEP seconds is closed.

Not every lookup: a name listed a moment ago by `ls`, `find` or a walk (opendir) is
looked up as part of that listing, and `ls -l` must not download 500 files. A lookup
that only wanted the size (`stat`, `test -e`) wastes one body: after WASTED_PAUSE such
in a row, no body is sent for PAUSE seconds, so a script that stats thousands of
paths costs a few bodies, not thousands.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import trio

from .errors import EnosfsError

log = logging.getLogger(__name__)

SIZE = 128 * 1024  # the kernel's first read of a file, and a small file whole
KEEP = 2.0  # seconds an untaken body is held after its head came
MOST = 8  # bodies held or on their way at once
WASTED_PAUSE = 8  # bodies in a row nobody took, before a pause
PAUSE = 60.0


Opener = Callable[[Any, int, int], AbstractAsyncContextManager[Any]]


@dataclass
class _Early:
    ref: Any
    ready: trio.Event = field(default_factory=trio.Event)
    released: trio.Event = field(default_factory=trio.Event)
    body: Any = None
    state: str = "asked"  # asked -> ready -> taken | abandoned; or failed


class FirstBytes:
    """First-bytes bodies by file, each taken at most once."""

    def __init__(
        self,
        opener: Opener,
        nursery: trio.Nursery | None,
        *,
        size: int = SIZE,
        keep: float = KEEP,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.opener = opener  # (ref, first, last) -> async context manager of a body
        self.nursery = nursery  # None: none are sent (mount.py gives its own)
        self.size = size
        self.keep = keep
        self.most = MOST  # held at once; mount.py lowers it for a small connection pool
        self.clock = clock
        self.early: dict[Any, _Early] = {}
        self.wasted_in_a_row = 0
        self.paused_until = float("-inf")
        self.counts = {"sent": 0, "taken": 0, "wasted": 0, "failed": 0, "paused": 0}

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def start(self, ref: Any) -> None:
        """Ask for ref's first bytes now, unless they are asked for already, too many
        are held, or lookups lately only wanted sizes."""
        if self.nursery is None or ref in self.early or len(self.early) >= self.most:
            return
        if self.clock() < self.paused_until:
            self.counts["paused"] += 1
            return
        entry = _Early(ref)
        self.early[ref] = entry
        self.counts["sent"] += 1
        self.nursery.start_soon(self._hold, entry)

    async def _hold(self, entry: _Early) -> None:
        try:
            async with self.opener(entry.ref, 0, self.size - 1) as body:
                entry.body = body
                entry.state = "ready"
                entry.ready.set()
                with trio.move_on_after(self.keep):
                    await entry.released.wait()
                if entry.state == "ready":
                    entry.state = "abandoned"  # from here on, take() passes it by
                    self._wasted()
                    return
                # Taken: the reader owns the body until it lets go (its own deadline
                # bounds that); leaving this block closes the response.
                await entry.released.wait()
        except EnosfsError as exc:
            entry.state = "failed"
            self.counts["failed"] += 1
            log.debug("first bytes of %s not fetched ahead: %s", entry.ref, exc)
        except Exception:
            # A bug, not a server fault: said once, and kept from the mount's nursery,
            # which it must not take down; the reader asks for its own body.
            entry.state = "failed"
            self.counts["failed"] += 1
            log.exception("first bytes of %s: unexpected error", entry.ref)
        finally:
            if entry.state not in ("taken", "abandoned", "failed"):
                entry.state = "failed"  # cancelled (unmount) before it came
            entry.ready.set()
            if self.early.get(entry.ref) is entry:
                del self.early[entry.ref]

    def _wasted(self) -> None:
        self.counts["wasted"] += 1
        self.wasted_in_a_row += 1
        if self.wasted_in_a_row >= WASTED_PAUSE:
            log.debug("first bytes fetched at lookup went unread %d times", WASTED_PAUSE)
            self.paused_until = self.clock() + PAUSE
            self.wasted_in_a_row = 0

    def has(self, ref: Any) -> bool:
        return ref in self.early

    def taking(self, ref: Any) -> AbstractAsyncContextManager[Any | None]:
        """The body held for ref (waited for if it is on its way), or None; it is the
        caller's until the block ends."""
        return _Taken(self, ref)

    async def _take(self, ref: Any) -> _Early | None:
        entry = self.early.get(ref)
        if entry is None:
            return None
        await entry.ready.wait()
        if entry.state != "ready" or self.early.get(ref) is not entry:
            return None
        entry.state = "taken"
        del self.early[ref]
        self.counts["taken"] += 1
        self.wasted_in_a_row = 0
        return entry


class _Taken:
    def __init__(self, owner: FirstBytes, ref: Any) -> None:
        self.owner = owner
        self.ref = ref
        self.entry: _Early | None = None

    async def __aenter__(self) -> Any | None:
        self.entry = await self.owner._take(self.ref)
        return None if self.entry is None else self.entry.body

    async def __aexit__(self, *exc: object) -> None:
        if self.entry is not None:
            self.entry.released.set()
