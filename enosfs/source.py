"""What the block cache needs of a file store, and nothing more.

The cache is written against these two protocols rather than against EnosClient, so it
can be driven by anything that serves file bytes: the real client over HTTP, or an
in-process fake whose faults a test scripts (tests/fake_source.py). Keeping the
interface this narrow is also what keeps the cache free of HTTP: every failure crosses
it as an enosfs error (errors.py), never as an httpx one.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from enosfs.api import FileMeta, FileRef
from enosfs.retry import RetryPolicy


class Download(Protocol):
    """An open body: where its bytes start and how many the server promised.

    `ranged` False means the server ignored Range and sends the whole file from byte 0
    (`start` is then 0); `total` is the file's size where the server said it; `etag`
    lets a reader notice that the file changed between two requests.
    """

    @property
    def start(self) -> int: ...

    @property
    def length(self) -> int | None: ...

    @property
    def total(self) -> int | None: ...

    @property
    def ranged(self) -> bool: ...

    @property
    def etag(self) -> str | None: ...

    async def readinto(self, view: memoryview) -> int:
        """Fill the start of view with the next bytes; 0 at the end of the body.

        A body that breaks off (connection lost, no bytes within the read timeout)
        raises TransportError (DeadlineError for the timeout): the bytes already read
        are good, and a new download from where they end resumes it.
        """
        ...


class Source(Protocol):
    """A store of files the block cache reads from."""

    @property
    def policy(self) -> RetryPolicy:
        """The deadline of one call (its retries included): how long a reader waits."""
        ...

    async def file_meta(self, ref: FileRef) -> FileMeta: ...

    def open_download(
        self, ref: FileRef, start: int = 0, end: int | None = None
    ) -> AbstractAsyncContextManager[Download]:
        """Bytes [start, end] of a file (end inclusive; None: to its end).

        Opening fails with an enosfs error once the source's own retries are spent
        (RateLimited, ServerError, TransportError, DeadlineError...): the caller does not
        retry it again.
        """
        ...
