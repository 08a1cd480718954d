"""An in-process file source for the block cache: files held as bytes, faults scripted
per test, every request and body byte counted.

It stands where EnosClient stands (enosfs.source.Source), so the cache's tests run in
the test process, without an emulator, sockets or a mount, and with trio's autojump
clock where they wait. It models the client as the cache sees it, after the client's own
work: a 429 or a 5xx arrives as the RateLimited or ServerError the client raises once
its retries are spent, and a body that breaks off raises the TransportError (or, past
the read timeout, the DeadlineError) that api.Body raises. What the client itself does
over HTTP is tested against the emulator (test_client.py, and one test in
test_blocks.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

from enosfs.api import FileMeta, FileRef
from enosfs.errors import DeadlineError, NotFound, RateLimited, ServerError, TransportError
from enosfs.naming import uri_id
from enosfs.retry import RetryPolicy

ORG = "o00000000000000001"
CHUNK = 64 * 1024  # the most one readinto gives, as a socket read does
BODY_FAULTS = ("cut", "reset", "stall", "trickle", "corrupt")
OPEN_FAULTS = ("latency", "error")


@dataclass
class Fault:
    """One scripted misbehaviour, for the requests whose kind (`files.download`,
    `files.getFileInfo`) matches `match`, and only `times` of them if set.

    | kind    | what the cache sees                                                   |
    |---------|-----------------------------------------------------------------------|
    | cut     | the body ends early, cleanly, after `after` bytes                     |
    | reset   | the body breaks off with TransportError after `after` bytes            |
    | stall   | the body stops for `seconds` after `after` bytes; past the read       |
    |         | timeout it breaks off with DeadlineError                               |
    | trickle | the body comes at `rate` bytes per second                             |
    | corrupt | the byte at body offset `after` is flipped                            |
    | latency | the answer comes `seconds` later; past the deadline, DeadlineError    |
    | error   | opening fails: RateLimited for `status` 429, ServerError for a 5xx     |
    """

    kind: str
    match: str = "files.download"
    after: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    status: int = 503
    times: int | None = None
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in BODY_FAULTS + OPEN_FAULTS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.kind == "trickle" and self.rate <= 0:
            raise ValueError("a trickle needs rate > 0 (bytes per second)")


class Scripted(Protocol):
    """A scripted fault as take() sees it: which calls it is for, and how often."""

    match: str
    times: int | None
    fired: int


S = TypeVar("S", bound=Scripted)


def take(faults: list[S], kind: str, about: tuple[str, ...] = ()) -> list[S]:
    """The faults a call of this kind gets, each counted as fired. A fault naming what it
    is `about` (an asset, a fileUri...) fires only for calls about that."""
    got = []
    for fault in faults:
        if not fnmatch.fnmatchcase(kind, fault.match):
            continue
        target = getattr(fault, "about", None)
        if target is not None and target not in about:
            continue
        if fault.times is not None and fault.fired >= fault.times:
            continue
        fault.fired += 1
        got.append(fault)
    return got


@dataclass
class FakeFile:
    data: bytes
    etag: str
    md5: str | None


class FakeBody:
    """One open download of bytes [start, start + length) of a file."""

    def __init__(
        self,
        source: FakeSource,
        data: bytes,
        start: int,
        length: int,
        *,
        ranged: bool,
        etag: str,
        faults: list[Fault],
        what: str,
    ) -> None:
        self.start = start
        self.length: int | None = length
        self.total: int | None = len(data)
        self.ranged = ranged
        self.etag: str | None = etag
        self.closed = False
        self._source = source
        self._view = memoryview(data)[start : start + length]
        self._sent = 0
        self._end = length
        self._pending = [f for f in faults if f.kind in ("cut", "reset", "stall")]
        self._lasting = [f for f in faults if f.kind in ("trickle", "corrupt")]
        self._what = what

    async def readinto(self, view: memoryview) -> int:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise AssertionError("a body read after its download was closed")
        n = min(len(view), CHUNK, self._end - self._sent)
        for fault in list(self._pending):
            if fault.after > self._sent:
                n = min(n, fault.after - self._sent)  # stop at the fault's byte
                continue
            self._pending.remove(fault)
            await self._break(fault)
            n = min(n, self._end - self._sent)
        for fault in self._lasting:
            if fault.kind == "trickle":
                n = min(n, max(1, int(fault.rate / 10)))
        if n <= 0:
            return 0
        chunk = self._view[self._sent : self._sent + n]
        view[:n] = chunk
        for fault in self._lasting:
            if fault.kind == "corrupt" and self._sent <= fault.after < self._sent + n:
                view[fault.after - self._sent] ^= 0xFF
            elif fault.kind == "trickle":
                await trio.sleep(n / fault.rate)
        self._sent += n
        self._source.counts["files.download.bytes"] += n
        return n

    async def _break(self, fault: Fault) -> None:
        if fault.kind == "cut":
            self._end = self._sent
        elif fault.kind == "reset":
            raise TransportError(f"{self._what}: body broken off: connection reset (injected)")
        else:
            timeout = self._source.read_timeout
            with trio.move_on_after(timeout):
                await trio.sleep(fault.seconds)
                return
            raise DeadlineError(f"{self._what}: body broken off: timed out (ReadTimeout)")


class FakeSource:
    """Files as bytes behind the Source protocol, with switches and faults a test sets.

    `counts` has the emulator's names: files.download (requests), .ranged, .full (a
    server that ignores Range), .bytes (body bytes handed out), and files.getFileInfo.
    """

    def __init__(self, *, timeout: float = 10.0) -> None:
        self.policy = RetryPolicy(timeout=timeout)
        self.read_timeout = timeout  # as mount.py gives httpx: the same number
        self.honour_range = True
        self.faults: list[Fault] = []
        self.counts: Counter[str] = Counter()
        self.open_bodies = 0
        # Downloads asked for and not yet ended, those still waiting for their answer
        # (a round trip away) included: the ranges a reader has on their way.
        self.requests_under_way = 0
        self._files: dict[str, FakeFile] = {}
        self._versions = 0

    # -- what a test sets up -----------------------------------------------------------

    def add(
        self, data: bytes, *, md5: bool | str = True, ext: str = ".bin", asset: str = "asset-1"
    ) -> FileRef:
        """A new file; md5 True computes its digest, a string gives it, False: none."""
        uri = f"enos-connect://{len(self._files) + 1:016x}{ext}"
        ref = FileRef(ORG, asset, "feature", uri)
        self.replace(ref, data, md5=md5)
        return ref

    def replace(self, ref: FileRef, data: bytes, *, md5: bool | str = True) -> None:
        """New bytes under the same fileUri, with a new ETag: the file changed."""
        self._versions += 1
        digest = hashlib.md5(data).hexdigest() if md5 is True else md5 or None
        self._files[ref.uri] = FakeFile(data, f'"v{self._versions}"', digest)

    def stats(self) -> dict[str, int]:
        return dict(self.counts)

    def reset_stats(self) -> None:
        self.counts.clear()

    # -- the Source protocol -----------------------------------------------------------

    async def file_meta(self, ref: FileRef) -> FileMeta:
        what = f"file info {uri_id(ref.uri)}"
        self.counts["files.getFileInfo"] += 1
        await self._answer(self._take("files.getFileInfo"), what)
        f = self._file(ref, what)
        return FileMeta(uri=ref.uri, size=len(f.data), md5=f.md5)

    @asynccontextmanager
    async def open_download(
        self, ref: FileRef, start: int = 0, end: int | None = None
    ) -> AsyncIterator[FakeBody]:
        self.requests_under_way += 1
        try:
            async with self._download(ref, start, end) as body:
                yield body
        finally:
            self.requests_under_way -= 1

    @asynccontextmanager
    async def _download(self, ref: FileRef, start: int, end: int | None) -> AsyncIterator[FakeBody]:
        what = f"download {uri_id(ref.uri)}"
        self.counts["files.download"] += 1
        faults = self._take("files.download")
        await self._answer(faults, what)
        f = self._file(ref, what)
        size = len(f.data)
        ranged = self.honour_range and (start > 0 or end is not None)
        if not ranged:
            self.counts["files.download.full"] += 1
            start, length = 0, size
        else:
            self.counts["files.download.ranged"] += 1
            last = size - 1 if end is None else min(end, size - 1)
            start = min(start, size)  # past the end: an empty body, as after a 416
            length = max(0, last - start + 1)
        body = FakeBody(
            self, f.data, start, length, ranged=ranged, etag=f.etag, faults=faults, what=what
        )
        self.open_bodies += 1
        try:
            yield body
        finally:
            body.closed = True
            self.open_bodies -= 1

    # -- inside ------------------------------------------------------------------------

    def _take(self, kind: str) -> list[Fault]:
        return take(self.faults, kind)

    async def _answer(self, faults: list[Fault], what: str) -> None:
        """Wait and fail as the open-time faults say, within the call's deadline."""
        for fault in faults:
            if fault.kind == "latency":
                if fault.seconds >= self.policy.timeout:
                    await trio.sleep(self.policy.timeout)
                    raise DeadlineError(f"{what}: no answer within {self.policy.timeout:g}s")
                await trio.sleep(fault.seconds)
            elif fault.kind == "error":
                if fault.status == 429:
                    raise RateLimited("rate limit exceeded", None, http_status=429, what=what)
                raise ServerError(
                    fault.status, f"HTTP {fault.status}", http_status=fault.status, what=what
                )

    def _file(self, ref: FileRef, what: str) -> FakeFile:
        f = self._files.get(ref.uri)
        if f is None:
            raise NotFound(99404, "file not found", http_status=200, what=what)
        return f
