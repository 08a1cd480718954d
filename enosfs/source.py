"""What the block cache and the catalog need of EnOS, and nothing more.

The cache (`Source`, `Download`) and the catalog (`Listings`) are written against these
protocols rather than against EnosClient, so they can be driven by the real client over
HTTP or by an in-process fake whose faults a test scripts (tests/fake_source.py,
tests/fake_listings.py). Keeping the interfaces this narrow is also what keeps those
layers free of HTTP: every failure crosses them as an enosfs error (errors.py), never
as an httpx one.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from enosfs.api import Device, FileFeatures, FileMeta, FileRef, Firmware
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


class Listings(Protocol):
    """What the catalog asks of EnOS to find an organisation's files.

    There is no "list files" API, so this is the walk's every step: devices, their thing
    model's FILE features, the latest values of those features, the product's firmware,
    and one file's record. A call fails with an enosfs error once the implementation's
    own retries are spent: Denied where the app may not use that API, NotFound where the
    thing is not there, BadRecord (file_meta) where one file's record is unusable.
    """

    async def search_devices(self, org: str) -> list[Device]:
        """Every device of the organisation (all pages)."""
        ...

    async def get_device(self, org: str, asset_id: str) -> Device: ...

    async def get_file_features(self, org: str, model_id: str) -> FileFeatures:
        """The identifiers of the thing model's FILE-typed features."""
        ...

    async def query_latest(self, org: str, asset_id: str, ids: list[str]) -> dict[str, Any]:
        """{measurement point id: latest value}; a point with no value may be absent."""
        ...

    async def search_firmwares(self, org: str, product_key: str) -> list[Firmware]:
        """The product's firmware (all pages)."""
        ...

    async def file_meta(self, ref: FileRef) -> FileMeta: ...
