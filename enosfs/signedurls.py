"""Download URLs of files kept in object storage (`enos-lark://`): one per file, asked
for once, shared by every reader, and renewed before it expires.

Such a file is read in two steps: EnOS's `getDownloadUrl` names a pre-signed URL on
the object store, and the bytes come from a plain GET of that URL. Asking for a URL per
block would double the round trips of every read, so a URL is kept until shortly
before the expiry its query carries (or a conservative default where it carries none),
and dropped early when the object store refuses it; readers who find it missing wait
for the one fetch under way instead of each starting their own.

The URL's query is a credential (its signature lets anyone read the file until it
expires): only `SignedUrl.shown` (scheme, host and path) may reach a log or a message.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar

import httpx
import trio

from enosfs.errors import EnosfsError, ProtocolError
from enosfs.transport import Origin, origin_of

LARK_SCHEME = "enos-lark://"
# Where the URL does not say when it expires: kept this long, a 403 renews it sooner.
DEFAULT_LIFETIME = 300.0
# Renewed this share of its lifetime early (at most MAX_MARGIN seconds): a URL handed to
# a download at the last moment must still be good when the object store checks it.
MARGIN_SHARE = 0.2
MAX_MARGIN = 60.0
MAX_KEPT = 10_000
K = TypeVar("K", bound=Hashable)


def is_lark(uri: str) -> bool:
    """Is this a fileUri of a file kept in object storage?"""
    return uri.startswith(LARK_SCHEME)


@dataclass(frozen=True)
class SignedUrl:
    """One pre-signed URL, split the way the lean transport sends it."""

    origin: Origin
    target: bytes  # path and query, as sent: the query is the signature
    shown: str  # scheme://host[:port]/path: what a log may say
    lifetime: float  # seconds it is good for, from when it was fetched
    fetched_at: float = field(default=0.0)  # trio clock

    @property
    def good_until(self) -> float:
        margin = min(MAX_MARGIN, self.lifetime * MARGIN_SHARE)
        return self.fetched_at + self.lifetime - margin


def shown_url(url: str | httpx.URL) -> str:
    """scheme://host[:port]/path: a URL without its query, fragment or user info."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "(not a URL)"
    port = f":{u.port}" if u.port else ""
    return f"{u.scheme}://{u.host}{port}{u.path}"


def lifetime_of(url: httpx.URL, now_wall: float) -> float:
    """How long a pre-signed URL is good for, read from its query: S3's
    X-Amz-Date + X-Amz-Expires, OSS's or S3 v2's Expires (Unix time), Azure's se (ISO
    time); DEFAULT_LIFETIME where none is there. An absolute expiry already past by
    this machine's clock is taken for clock skew, and the default used: a refusal by
    the object store renews the URL all the same."""
    params = {k.lower(): v for k, v in url.params.multi_items()}
    relative = _number(params.get("x-amz-expires"))
    absolute: float | None = None
    if relative is not None:
        signed = _time(params.get("x-amz-date"), "%Y%m%dT%H%M%SZ")
        if signed is not None:
            absolute = signed + relative
    elif (expires := _number(params.get("expires"))) is not None:
        absolute = expires
    elif (se := params.get("se")) is not None:
        absolute = _iso_time(se)
    left = None if absolute is None else absolute - now_wall
    if relative is not None:
        # The signing time is the server's clock: trusted only to shorten the lifetime.
        return relative if left is None or left <= 0 else min(relative, left)
    if left is not None and left > 0:
        return left
    return DEFAULT_LIFETIME


def _number(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def _time(value: str | None, fmt: str) -> float | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, fmt).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _iso_time(value: str) -> float | None:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_signed(raw: object, what: str, now: float, now_wall: float) -> SignedUrl:
    """A getDownloadUrl answer's data as a SignedUrl; ProtocolError for anything that
    is not an absolute http(s) URL. The data is never quoted in the error."""
    if not isinstance(raw, str) or not raw:
        raise ProtocolError(f"{what}: the answer's data is not a URL")
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, TypeError):
        raise ProtocolError(f"{what}: the answer's data is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ProtocolError(f"{what}: the answer's data is not an http(s) URL")
    return SignedUrl(
        origin=origin_of(url),
        target=url.raw_path,
        shown=shown_url(url),
        lifetime=lifetime_of(url, now_wall),
        fetched_at=now,
    )


@dataclass
class _Pending:
    """A fetch under way, awaited by every reader that needs the same URL."""

    done: trio.Event = field(default_factory=trio.Event)
    url: SignedUrl | None = None
    error: EnosfsError | None = None


class SignedUrls(Generic[K]):
    """fileUri (with the rest of its FileRef) -> its current URL, fetched by `fetch`
    (the getDownloadUrl call) at most once at a time per file."""

    def __init__(
        self,
        fetch: Callable[[K], Awaitable[str]],
        *,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._wall = wall
        self._kept: dict[K, SignedUrl] = {}
        self._pending: dict[K, _Pending] = {}
        self.fetched = 0
        self.renewed_early = 0  # dropped because the object store refused them

    def stats(self) -> dict[str, int]:
        """Its part of /.enosfs/stats: URLs asked for, kept now, and refused early."""
        return {"fetched": self.fetched, "kept": len(self._kept), "refused": self.renewed_early}

    async def get(self, key: K, what: str) -> SignedUrl:
        """The URL to read `key` from now: a kept one still good, or a new one."""
        while True:
            kept = self._kept.get(key)
            if kept is not None and self._clock() < kept.good_until:
                return kept
            pending = self._pending.get(key)
            if pending is None:
                return await self._renew(key, what)
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            if pending.url is not None:
                return pending.url
            # The fetch was cancelled (its reader went away): try again.

    def rejected(self, key: K, url: SignedUrl) -> None:
        """The object store refused `url` (expired or revoked): forget it, unless a newer
        one has already replaced it (many readers may report the same refusal)."""
        if self._kept.get(key) is url:
            del self._kept[key]
            self.renewed_early += 1

    async def _renew(self, key: K, what: str) -> SignedUrl:
        pending = self._pending[key] = _Pending()
        try:
            raw = await self._fetch(key)
            url = parse_signed(raw, what, self._clock(), self._wall())
            self.fetched += 1
            if len(self._kept) >= MAX_KEPT:
                self._forget_stale()
            self._kept[key] = pending.url = url
            return url
        except EnosfsError as exc:
            pending.error = exc
            raise
        finally:
            del self._pending[key]
            pending.done.set()

    def _forget_stale(self) -> None:
        now = self._clock()
        for key in [k for k, u in self._kept.items() if u.good_until <= now]:
            del self._kept[key]
        if len(self._kept) >= MAX_KEPT:
            self._kept.clear()
