"""The EnOS client: envelopes, errors, token use, retries and streamed downloads.

It knows HTTP and EnOS and nothing of FUSE. Every call has a deadline; a rejected token
is renewed once (shared by all callers) and the call retried once; failure envelopes
become exceptions carrying code, message and requestId, whatever HTTP status they came
with, so that an envelope is never mistaken for file content.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
import trio

from enosfs.auth import TokenSource
from enosfs.errors import (
    ApiError,
    EnosfsError,
    InvalidArgument,
    NotFound,
    ProtocolError,
    RateLimited,
    ServerError,
    TokenRejected,
    UrlRefused,
    error_for_code,
)
from enosfs.firstbytes import FirstBytes
from enosfs.jsonbody import read_capped
from enosfs.naming import uri_id
from enosfs.retry import RetryPolicy, as_enosfs_error, retrying
from enosfs.settings_schema import default
from enosfs.signedurls import SignedUrls, is_lark, shown_url
from enosfs.throttle import ApiThrottle
from enosfs.transport import LeanTransport, Origin, origin_of

log = logging.getLogger(__name__)
T = TypeVar("T")

DEVICE_PAGE = 200
FIRMWARE_PAGE = 50
MAX_PAGES = 10_000
_PEEK = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")
# The fields of an object store's XML error (S3, OSS, Azure) worth a log line.
_XML_FIELD = re.compile(rb"<(Code|Message)>([^<]{0,300})</(?:Code|Message)>")
_URL_IN_TEXT = re.compile(r"https?://\S+")
# S3 answers some refusals of a pre-signed URL with 400 rather than 403.
_REFUSED_400 = {"ExpiredToken", "InvalidToken", "AuthorizationQueryParametersError"}


# -- what the listing and file APIs answer ---------------------------------------------


@dataclass(frozen=True)
class FileRef:
    """Everything a files API call needs to name one file. The device is named by its
    asset id or, where only they are known (asset "", a configured file), by its
    product and device key: the files API takes either."""

    org: str
    asset: str
    category: str
    uri: str
    product_key: str = ""
    device_key: str = ""

    def params(self) -> dict[str, str]:
        device = (
            {"assetId": self.asset}
            if self.asset
            else {"productKey": self.product_key, "deviceKey": self.device_key}
        )
        return {"orgId": self.org, **device, "category": self.category, "fileUri": self.uri}


INT64_MAX = 2**63 - 1
# The latest time, in ms, whose nanoseconds still fit a file time (int64): year 2262.
MAX_TIME_MS = INT64_MAX // 1_000_000


class BadRecord(ProtocolError):
    """One file's metadata cannot be represented (a size beyond what a file can hold, a
    negative or fractional one): it costs that file, never the folder it sits in."""


@dataclass(frozen=True)
class FileMeta:
    """What is known of a file's content. size None: the server would not say."""

    uri: str
    size: int | None
    md5: str | None = None
    original_name: str | None = None
    create_time_ms: int | None = None
    sign_method: str | None = None
    sign: str | None = None
    etag: str | None = None  # from a Range probe, where there is no digest to go by

    def __post_init__(self) -> None:
        # Checked here, not only where JSON is parsed: a probe's Content-Range can be
        # just as wrong, and one impossible size must not reach the kernel.
        if self.size is not None and not 0 <= self.size <= INT64_MAX:
            raise BadRecord(f"{uri_id(self.uri)}: size {_shown(self.size)} is not a file size")

    @property
    def version(self) -> tuple[int | None, str | None]:
        """Identifies this content: a change of size, digest or ETag means new bytes.
        The sign comes first: the firmware search gives only the sign, getFileInfo the
        sign and the md5, and the same file must not look changed between the two."""
        return (self.size, self.sign or self.md5 or self.etag)

    @property
    def digest(self) -> tuple[str, str] | None:
        """(algorithm, hex digest) the bytes can be checked against, if EnOS gave one."""
        if self.md5:
            return ("md5", self.md5)
        if self.sign and self.sign_method in ("md5", "sha256"):
            return (self.sign_method, self.sign)
        return None


@dataclass(frozen=True)
class Device:
    asset_id: str
    product_key: str
    device_key: str
    name: str
    model_id: str
    attributes: dict[str, Any]
    create_time_ms: int | None


@dataclass(frozen=True)
class Firmware:
    firmware_id: str
    product_key: str
    name: str
    version: str
    url: str
    size: int | None
    sign_method: str | None
    sign: str | None
    create_time_ms: int | None


@dataclass(frozen=True)
class FileFeatures:
    """The identifiers of a thing model's features whose data type is FILE."""

    attributes: tuple[str, ...] = ()
    measurepoints: tuple[str, ...] = ()
    events: tuple[str, ...] = ()


def _i18n(value: Any) -> str:
    if isinstance(value, dict):
        v = value.get("defaultValue")
        if isinstance(v, str) and v:
            return v
        i18n = value.get("i18nValue")
        if isinstance(i18n, dict):
            for v in i18n.values():
                if isinstance(v, str) and v:
                    return v
        return ""
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _size(value: Any) -> int | None:
    """A byte count a file can have, or None."""
    n = _int(value)
    return n if n is not None and 0 <= n <= INT64_MAX else None


def _time_ms(value: Any) -> int | None:
    """A createTime a file time can show (1970 to 2262), or None: the mount's own time
    is shown instead of failing the folder."""
    n = _int(value)
    return n if n is not None and 0 <= n <= MAX_TIME_MS else None


def _shown(value: Any) -> str:
    """A value from the server, short enough for one log line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_device(d: Any) -> Device | None:
    if not isinstance(d, dict) or not isinstance(d.get("assetId"), str) or not d["assetId"]:
        return None
    attrs = d.get("deviceAttributes")
    return Device(
        asset_id=d["assetId"],
        product_key=_str(d.get("productKey")),
        device_key=_str(d.get("deviceKey")),
        name=_i18n(d.get("deviceName")),
        model_id=_str(d.get("modelId")),
        attributes=attrs if isinstance(attrs, dict) else {},
        create_time_ms=_time_ms(d.get("createTime")),
    )


def parse_firmware(f: Any, product_key: str = "") -> Firmware | None:
    if not isinstance(f, dict) or not isinstance(f.get("fileUrl"), str) or not f["fileUrl"]:
        return None
    return Firmware(
        firmware_id=_str(f.get("firmwareId")),
        product_key=_str(f.get("productKey")) or product_key,
        name=_i18n(f.get("name")) or _str(f.get("firmwareId")),
        version=_str(f.get("version")),
        url=f["fileUrl"],
        # An impossible size is as good as none: getFileInfo is asked instead.
        size=_size(f.get("fileSize")),
        sign_method=_str(f.get("signMethod")).lower() or None,
        sign=_str(f.get("sign")).lower() or None,
        create_time_ms=_time_ms(f.get("createTime")),
    )


def parse_file_meta(uri: str, d: Any) -> FileMeta:
    if not isinstance(d, dict):
        raise ProtocolError(f"getFileInfo {uri_id(uri)}: answer has no data")
    raw = d.get("fileSize")
    if raw is None:
        raise ProtocolError(f"getFileInfo {uri_id(uri)}: answer has no valid fileSize")
    size = _size(raw)
    if size is None:
        raise BadRecord(f"getFileInfo {uri_id(uri)}: fileSize {_shown(raw)} is not a file size")
    md5 = _str(d.get("md5")).lower() or None
    return FileMeta(
        uri=uri,
        size=size,
        md5=md5 if md5 and re.fullmatch(r"[0-9a-f]{32}", md5) else None,
        original_name=_str(d.get("originalFilename")) or None,
        create_time_ms=_time_ms(d.get("createTime")),
        sign_method=_str(d.get("signMethod")).lower() or None,
        sign=_str(d.get("sign")).lower() or None,
    )


def file_features(model: Any) -> FileFeatures:
    """FILE-typed features of a thing model; the maps may also come as lists."""
    if not isinstance(model, dict):
        return FileFeatures()

    def pick(section: str) -> tuple[str, ...]:
        raw = model.get(section)
        items = raw.values() if isinstance(raw, dict) else raw if isinstance(raw, list) else []
        out = []
        for item in items:
            if not isinstance(item, dict):
                continue
            ident = item.get("identifier")
            dtype = item.get("dataType")
            if isinstance(dtype, dict):  # tolerate {"dataType": {"type": "FILE"}}
                dtype = dtype.get("type")
            if isinstance(ident, str) and ident and str(dtype).upper() == "FILE":
                out.append(ident)
        return tuple(sorted(out))

    return FileFeatures(pick("attributes"), pick("measurepoints"), pick("events"))


def parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """'bytes 0-99/1000' -> (0, 99, 1000); 'bytes */1000' -> (None, None, 1000)."""
    if not value:
        return (None, None, None)
    m = _CONTENT_RANGE.fullmatch(value.strip())
    if not m:
        return (None, None, None)
    first = int(m.group(1)) if m.group(1) is not None else None
    last = int(m.group(2)) if m.group(2) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return (first, last, total)


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def check_envelope(
    status: int, body: bytes, what: str, *, require_envelope: bool = True
) -> dict[str, Any] | None:
    """The envelope in a body, or an exception for whatever failure the body says.

    With require_envelope False (file content), a body that is not a failure envelope
    returns None: it may be the file itself.
    """
    if status == 401:
        raise TokenRejected(401, _message(body) or "unauthorized", http_status=401, what=what)
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        apim = _int(doc.get("apim_status"))
        if apim in (4011, 4012):
            raise TokenRejected(
                apim, _str(doc.get("msg")) or "token expired", http_status=status, what=what
            )
        code = doc.get("code")
        icode = _int(code)
        if (icode is not None and icode != 0 and "msg" in doc) or (icode and status >= 400):
            raise error_for_code(
                code,
                _str(doc.get("msg")),
                _str(doc.get("requestId")) or None,
                http_status=status,
                what=what,
            )
        if icode == 0 and status < 400:
            return doc
    if status == 429:
        raise RateLimited(_message(body) or "rate limit exceeded", None, http_status=429, what=what)
    if status >= 500:
        raise ServerError(status, _message(body) or f"HTTP {status}", http_status=status, what=what)
    if status >= 400:
        raise ApiError(
            f"HTTP {status}", _message(body) or "request failed", http_status=status, what=what
        )
    if require_envelope:
        raise ProtocolError(f"{what}: HTTP {status} without an EnOS envelope")
    return None


def _message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        text = body[:200].decode("utf-8", "replace").strip()
        return text.splitlines()[0] if text else ""
    if isinstance(doc, dict):
        return _str(doc.get("msg") or doc.get("message") or doc.get("error"))
    return ""


# -- downloads --------------------------------------------------------------------------


@dataclass
class Body:
    """An open download: where its bytes start, and how many the server promised."""

    start: int
    length: int | None
    total: int | None
    ranged: bool
    etag: str | None = None
    _prefix: bytes = b""
    _response: httpx.Response | None = None
    _chunks: AsyncIterator[bytes] | None = None
    _leftover: bytes = b""
    _what: str = "download"
    # Asked for at lookup and held (firstbytes.py): its head came before anyone asked
    # for it, and it ends where its own range does, not where the caller's does.
    held: bool = False

    async def readinto(self, view: memoryview) -> int:
        """Fill the start of view with the next body bytes; 0 at the end of the body.

        The socket writes straight into view (the lean transport's readinto), except
        after a JSON body was peeked at through httpx's chunks, which are copied in. A
        body that breaks off raises TransportError, or DeadlineError when no bytes came
        within the read timeout: callers (the block cache) know enosfs errors only, and
        resume from the bytes they have.
        """
        try:
            return await self._readinto(view)
        except httpx.TransportError as exc:
            raise as_enosfs_error(exc, f"{self._what}: body broken off") from None

    async def _readinto(self, view: memoryview) -> int:
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        if self._response is None:
            return 0
        direct = self._response.extensions.get("readinto")
        if direct is not None and self._chunks is None:
            return int(await direct(view))
        if not self._leftover:
            if self._chunks is None:
                self._chunks = self._response.aiter_raw()
            self._leftover = await anext(self._chunks, b"")
        n = min(len(view), len(self._leftover))
        view[:n] = self._leftover[:n]
        self._leftover = self._leftover[n:]
        return n

    async def chunks(self, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
        buf = bytearray(size)
        view = memoryview(buf)
        while n := await self.readinto(view):
            yield bytes(view[:n])


# -- the client -------------------------------------------------------------------------


class EnosClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        tokens: TokenSource,
        *,
        gateway: str,
        integration: str,
        policy: RetryPolicy | None = None,
        lean: LeanTransport,
        max_api_concurrency: int | None = None,
    ) -> None:
        self.http = http
        # One adaptive bound on every API call of the mount; file bodies only pass its
        # Retry-After gate (throttle.py says why).
        self.throttle = ApiThrottle(max_api_concurrency or default("max_api_concurrency"))
        # File bodies go through the lean transport (transport.py) by its own entry, past
        # httpx's client machinery; proxies included, so there is one path.
        self.lean = lean
        files_url = httpx.URL(f"{integration.rstrip('/')}/connect-service/v2.1/files")
        self._files_origin = origin_of(files_url)
        self._files_path = files_url.raw_path
        self._targets: dict[FileRef, bytes] = {}
        self._endpoints: dict[str, tuple[Origin, bytes]] = {}  # service URL -> where it goes
        self.tokens = tokens
        self.gateway = gateway.rstrip("/")
        self.integration = integration.rstrip("/")
        self.policy = policy or RetryPolicy()
        self.file_info_supported: bool | None = None  # learnt from the first call
        # Whether getFileInfo answers for files kept in object storage, learnt as well.
        self.lark_file_info: bool | None = None
        self.signed_urls: SignedUrls[FileRef] = SignedUrls(self.download_url)
        # Bodies of files' first bytes asked for at lookup; none until mount.py starts
        # them (firstbytes.py).
        self.first_bytes = FirstBytes(self._first_bytes, None)
        self._learning = trio.Lock()
        self.requests: Counter[str] = Counter()
        self.retries = 0

    def stats(self) -> dict[str, Any]:
        """Its part of /.enosfs/stats: what it asked EnOS, how often it tried again, and
        how hard the gateway pushed back."""
        return {
            "requests": dict(sorted(self.requests.items())),
            "retries": self.retries,
            "throttle": self.throttle.stats(),
            "signed_urls": self.signed_urls.stats(),
        }

    # -- plumbing ------------------------------------------------------------------------

    def _count_retry(self, _exc: BaseException) -> None:
        self.retries += 1

    async def _with_token(self, send: Callable[[str], Awaitable[T]]) -> T:
        """Send with the current token; on rejection renew it once and send again."""
        token = await self.tokens.get()
        try:
            return await send(token)
        except TokenRejected:
            self.tokens.rejected(token)
            token = await self.tokens.get()
            return await send(token)

    async def call(
        self,
        kind: str,
        method: str,
        url: str,
        params: dict[str, str],
        *,
        body: Any = None,
        what: str,
    ) -> dict[str, Any]:
        """One EnOS service call; returns the success envelope."""

        async def send(token: str) -> dict[str, Any]:
            # Connections for this call and those waiting, as many as the bound lets go
            # within a round, opened now: a call that waits for its slot needs one the
            # moment it gets it, and a new one costs a round trip far away.
            self.lean.open_ahead(self._endpoint(url)[0], self.throttle.next_round(joining=1))
            # The answer is judged inside the slot: a rate-limit envelope cuts the bound
            # as a 429 does.
            async with self.throttle.slot():
                self.requests[kind] += 1
                resp, content = await self._exchange_json(method, url, params, body, token, what)
                if resp.status_code == 429:
                    raise RateLimited(
                        _message(content) or "rate limit exceeded",
                        _retry_after(resp),
                        http_status=429,
                        what=what,
                    )
                doc = check_envelope(resp.status_code, content, what)
                assert doc is not None
                return doc

        return await retrying(
            self.policy, what, lambda: self._with_token(send), on_retry=self._count_retry
        )

    def expect_calls(self, count: int) -> None:
        """`count` getFileInfo calls are about to go at once (a folder's sizes): the
        connections their first round takes (as many as the bound lets through, and
        the call that may go alone first) are opened now. Far away, each call that
        finds none idle pays a connection's round trip before its own; the first
        round after the lone call would otherwise go half on new connections."""
        origin = self._endpoint(f"{self.integration}/connect-service/v2.1/files")[0]
        self.lean.open_ahead(origin, min(count, self.throttle.limit) + 1)

    async def _exchange_json(
        self, method: str, url: str, params: dict[str, str], body: Any, token: str, what: str
    ) -> tuple[httpx.Response, bytes]:
        """One request and its whole (capped) answer, straight on the lean transport.

        Not through httpx's client: its request building, URL parsing, cookie jar and
        redirect machinery cost more CPU than the exchange itself (measured with py-spy
        on `ls -l` of 500 files 40 ms away: half of the mount's time, which is what
        bounds a folder's 500 getFileInfo calls on two shared cores). The answer is
        read, capped, before the connection goes back to the pool."""
        origin, path = self._endpoint(url)
        target = path + b"?" + urlencode(params).encode() if params else path
        # Compressed answers welcome (a page of 200 devices shrinks several times on a
        # thin link); read_capped decodes them and caps what they decode to.
        headers = [
            (b"user-agent", b"enosfs"),
            (b"accept-encoding", b"gzip, deflate"),
            (b"apim-accesstoken", token.encode()),
        ]
        content = b""
        if body is not None:
            content = json.dumps(body, separators=(",", ":")).encode()
            headers.append((b"content-type", b"application/json"))
        if content or method in ("POST", "PUT", "PATCH"):
            headers.append((b"content-length", b"%d" % len(content)))
        resp = await self.lean.request(method, origin, target, headers, content, bulk=False)
        try:
            # Read under a ceiling: an answer past MAX_JSON is refused, not buffered.
            return resp, await read_capped(resp, what)
        finally:
            await resp.aclose()

    def _endpoint(self, url: str) -> tuple[Origin, bytes]:
        """The origin and path of a service URL (a handful per mount: kept parsed)."""
        known = self._endpoints.get(url)
        if known is None:
            parsed = httpx.URL(url)
            known = self._endpoints[url] = (origin_of(parsed), parsed.raw_path)
        return known

    # -- listing -------------------------------------------------------------------------

    async def search_devices_page(self, org: str, page_no: int) -> tuple[list[Device], int | None]:
        doc = await self.call(
            "devices.search",
            "POST",
            f"{self.gateway}/connect-service/v2.1/devices",
            {"action": "search", "orgId": org},
            body={
                "pagination": {"pageNo": page_no, "pageSize": DEVICE_PAGE},
                "projection": [
                    "assetId",
                    "productKey",
                    "deviceKey",
                    "deviceName",
                    "modelId",
                    "deviceAttributes",
                    "createTime",
                ],
            },
            what=f"device search in {org}",
        )
        data = doc.get("data")
        if not isinstance(data, list):
            raise ProtocolError(f"device search in {org}: answer has no data list")
        pagination = doc.get("pagination")
        total = _int(pagination.get("totalSize")) if isinstance(pagination, dict) else None
        return [d for d in map(parse_device, data) if d is not None], total

    async def search_devices(self, org: str) -> list[Device]:
        """Every device of an org, all pages; duplicates from shifting pages removed."""
        first, total = await self.search_devices_page(org, 1)
        seen: dict[str, Device] = {d.asset_id: d for d in first}
        if total is None or len(first) < DEVICE_PAGE:
            pages = 1
        else:
            pages = min(MAX_PAGES, -(-total // DEVICE_PAGE))
        if pages > 1:
            results: dict[int, list[Device]] = {}
            errors: list[EnosfsError] = []
            limiter = trio.Semaphore(4)

            async def fetch(n: int) -> None:
                # A failed page is kept, not raised: raised in a nursery it would come
                # out wrapped in an ExceptionGroup, not as the EnOS error it is.
                async with limiter:
                    try:
                        results[n], _ = await self.search_devices_page(org, n)
                    except EnosfsError as exc:
                        errors.append(exc)

            async with trio.open_nursery() as nursery:
                for n in range(2, pages + 1):
                    nursery.start_soon(fetch, n)
            if errors:
                raise errors[0]
            for n in sorted(results):
                for d in results[n]:
                    seen.setdefault(d.asset_id, d)
        return list(seen.values())

    async def get_device(self, org: str, asset_id: str) -> Device:
        doc = await self.call(
            "devices.get",
            "GET",
            f"{self.gateway}/connect-service/v2.1/devices",
            {"action": "get", "orgId": org, "assetId": asset_id},
            what=f"device {asset_id}",
        )
        device = parse_device(doc.get("data"))
        if device is None:
            raise ProtocolError(f"device {asset_id}: answer has no device")
        return device

    async def get_file_features(self, org: str, model_id: str) -> FileFeatures:
        doc = await self.call(
            "thing-models.get",
            "GET",
            f"{self.gateway}/model-service/v2.1/thing-models",
            {"action": "get", "orgId": org, "modelId": model_id},
            what=f"thing model {model_id}",
        )
        return file_features(doc.get("data"))

    async def query_latest(self, org: str, asset_id: str, ids: list[str]) -> dict[str, Any]:
        """Latest values of some measurement points: {id: value}."""
        doc = await self.call(
            "measurepoints.queryLatest",
            "POST",
            f"{self.gateway}/connect-service/v2.1/measurepoints",
            {"action": "queryLatest", "orgId": org, "assetId": asset_id},
            body={"measurepointIds": ids},
            what=f"latest measurement points of {asset_id}",
        )
        out: dict[str, Any] = {}
        data = doc.get("data")
        for item in data if isinstance(data, list) else []:
            if isinstance(item, dict) and isinstance(item.get("id"), str):
                out[item["id"]] = item.get("value")
        return out

    async def search_firmwares(self, org: str, product_key: str) -> list[Firmware]:
        found: dict[str, Firmware] = {}
        for page_no in range(1, MAX_PAGES + 1):
            doc = await self.call(
                "ota-firmwares.search",
                "POST",
                f"{self.gateway}/connect-service/v2.1/ota-firmwares",
                {"action": "search", "orgId": org},
                body={
                    "expression": f"productKey = '{product_key}'",
                    "pagination": {"pageNo": page_no, "pageSize": FIRMWARE_PAGE},
                },
                what=f"firmware search for product {product_key}",
            )
            data = doc.get("data")
            if not isinstance(data, list):
                raise ProtocolError(f"firmware search for {product_key}: answer has no data list")
            for f in data:
                fw = parse_firmware(f, product_key)
                if fw is not None and fw.product_key == product_key:
                    found.setdefault(fw.firmware_id or fw.url, fw)
            pagination = doc.get("pagination")
            total = _int(pagination.get("totalSize")) if isinstance(pagination, dict) else None
            if len(data) < FIRMWARE_PAGE or (
                total is not None and page_no * FIRMWARE_PAGE >= total
            ):
                break
        return list(found.values())

    # -- files ---------------------------------------------------------------------------

    async def file_meta(self, ref: FileRef) -> FileMeta:
        """Size and digest of a file, by getFileInfo or, on older servers, a Range probe.

        Whether the server has getFileInfo is learnt once, by the first call, while the
        others wait: a listing of many files must not ask an old server many times.
        """
        if is_lark(ref.uri):
            return await self._lark_meta(ref)
        if self.file_info_supported is None:
            async with self._learning:
                if self.file_info_supported is None:
                    return await self._file_info(ref, learning=True)
        if self.file_info_supported:
            return await self._file_info(ref, learning=False)
        return await self.probe(ref)

    async def _file_info_doc(self, ref: FileRef) -> dict[str, Any]:
        return await self.call(
            "files.getFileInfo",
            "GET",
            f"{self.integration}/connect-service/v2.1/files",
            {"action": "getFileInfo", **ref.params()},
            what=f"file info {uri_id(ref.uri)}",
        )

    async def _lark_meta(self, ref: FileRef) -> FileMeta:
        """A file kept in object storage: getFileInfo where the server answers it for
        such files, else a Range probe on its signed URL. Learnt apart from getFileInfo
        for other files: a server may answer it for one kind and not the other."""
        if self.file_info_supported is False or self.lark_file_info is False:
            return await self.probe(ref)
        try:
            doc = await self._file_info_doc(ref)
        except ApiError as exc:
            if self.lark_file_info is not None or not _maybe_unsupported(exc):
                raise
            log.info(
                "server has no getFileInfo for files kept in object storage (%s); "
                "sizing them by Range probes",
                exc,
            )
            self.lark_file_info = False
            return await self.probe(ref)
        self.lark_file_info = True
        return parse_file_meta(ref.uri, doc.get("data"))

    async def download_url(self, ref: FileRef) -> str:
        """getDownloadUrl: where a file kept in object storage can be read from now. The
        answer is a credential (signedurls.py): it is returned, never logged."""
        doc = await self.call(
            "files.getDownloadUrl",
            "GET",
            f"{self.integration}/connect-service/v2.1/files",
            {"action": "getDownloadUrl", **ref.params()},
            what=f"download URL {uri_id(ref.uri)}",
        )
        data = doc.get("data")
        return data if isinstance(data, str) else ""

    async def _file_info(self, ref: FileRef, *, learning: bool) -> FileMeta:
        try:
            doc = await self._file_info_doc(ref)
        except ApiError as exc:
            if not (learning and _maybe_unsupported(exc)):
                raise
            meta = await self.probe(ref)
            log.info("server has no getFileInfo (%s); sizing files by Range probes", exc)
            self.file_info_supported = False
            return meta
        meta = parse_file_meta(ref.uri, doc.get("data"))
        self.file_info_supported = True
        return meta

    async def probe(self, ref: FileRef) -> FileMeta:
        """The size of a file from the headers of a one-byte ranged download."""
        async with self.open_download(ref, 0, 0, kind="files.probe") as body:
            if body.total is not None:
                return FileMeta(uri=ref.uri, size=body.total, etag=body.etag)
            if not body.ranged and body.length is not None:
                return FileMeta(uri=ref.uri, size=body.length, etag=body.etag)
            # Neither Content-Range nor Content-Length: only counting tells.
            n = 0
            async for chunk in body.chunks():
                n += len(chunk)
            return FileMeta(uri=ref.uri, size=n, etag=body.etag)

    @asynccontextmanager
    async def open_download(
        self,
        ref: FileRef,
        start: int = 0,
        end: int | None = None,
        *,
        kind: str = "files.download",
    ) -> AsyncIterator[Body]:
        """Open a download of bytes [start, end] (end inclusive, None = to the end).

        The Body says where its bytes really start: a server that ignores Range sends
        the whole file from 0, and the caller must cope. A file kept in object storage
        is read from its signed URL (_open_signed), by the same rules.
        """
        if start == 0 and kind == "files.download" and self.first_bytes.has(ref):
            # Its first bytes were asked for at lookup (firstbytes.py): take that body.
            async with self.first_bytes.taking(ref) as early:
                if early is not None:
                    early.held = True
                    yield early
                    return
        what = f"download {uri_id(ref.uri)}"
        headers = {"Accept-Encoding": "identity"}
        if start > 0 or end is not None:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end))
        # Opened by hand rather than with `async with` so the retry loop can hand an
        # open response out of the attempt that got it.
        holder: list[httpx.Response] = []

        async def send(token: str) -> Body:
            # A body takes no slot of the API bound (it may stream for minutes): it only
            # waits out a Retry-After, and a 429 it gets cuts the bound all the same.
            async with self.throttle.passage():
                return await open_one(token)

        async def open_one(token: str) -> Body:
            self.requests[kind] += 1
            raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
            raw.append((b"apim-accesstoken", token.encode()))
            raw.append((b"user-agent", b"enosfs"))
            resp = await self.lean.request(
                "GET", self._files_origin, self._download_target(ref), raw
            )
            try:
                body = await _classify_download(resp, start, what)
            except BaseException:
                await resp.aclose()
                raise
            holder.append(resp)
            return body

        async def attempt() -> Body:
            if is_lark(ref.uri):
                return await self._open_signed(ref, headers, start, what, kind, holder)
            return await self._with_token(send)

        body = await retrying(self.policy, what, attempt, on_retry=self._count_retry)
        try:
            yield body
        finally:
            for resp in holder:
                with trio.CancelScope(shield=True):
                    await resp.aclose()

    def _first_bytes(
        self, ref: FileRef, first: int, last: int
    ) -> AbstractAsyncContextManager[Body]:
        return self.open_download(ref, first, last, kind="files.first_bytes")

    async def _open_signed(
        self,
        ref: FileRef,
        headers: dict[str, str],
        start: int,
        what: str,
        kind: str,
        holder: list[httpx.Response],
    ) -> Body:
        """One attempt at a file kept in object storage: a plain GET of its signed URL
        (kept, or asked for now), carrying no access token nor any other header of ours
        that holds a secret. A refused URL (expired, revoked) is forgotten and a new one
        tried at once; refused again, the reader gets EACCES."""
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        raw.append((b"user-agent", b"enosfs"))
        for fresh in (False, True):
            signed = await self.signed_urls.get(ref, f"download URL {uri_id(ref.uri)}")
            self.requests[kind.replace("files.", "objectstore.", 1)] += 1
            resp = await self.lean.request("GET", signed.origin, signed.target, raw)
            try:
                body = await _classify_object(resp, start, f"{what} from {signed.shown}")
            except UrlRefused as exc:
                await resp.aclose()
                self.signed_urls.rejected(ref, signed)
                if fresh:
                    raise
                log.debug("%s; asking for a new URL", exc)
                continue
            except BaseException:
                await resp.aclose()
                raise
            holder.append(resp)
            return body
        raise AssertionError("unreachable")

    def _download_target(self, ref: FileRef) -> bytes:
        target = self._targets.get(ref)
        if target is None:
            query = urlencode({"action": "download", **ref.params()}).encode()
            target = self._files_path + b"?" + query
            if len(self._targets) > 100_000:
                self._targets.clear()
            self._targets[ref] = target
        return target


def _maybe_unsupported(exc: ApiError) -> bool:
    """Would an older server without getFileInfo answer like this?"""
    return isinstance(exc, InvalidArgument) or exc.http_status in (400, 404, 405, 501)


async def _read_some(chunks: AsyncIterator[bytes], limit: int) -> tuple[bytes, bool]:
    """Up to about `limit` bytes of a body, and whether that was all of it."""
    parts: list[bytes] = []
    n = 0
    async for chunk in chunks:
        parts.append(chunk)
        n += len(chunk)
        if n > limit:
            return b"".join(parts), False
    return b"".join(parts), True


def _object_store_detail(body: bytes) -> tuple[str | None, str]:
    """The code and message of an object store's error body (XML, or JSON), with any
    URL in them cut to scheme://host/path; the body itself is never shown whole (S3's
    may repeat the string it signed)."""
    found = {
        m.group(1).decode(): m.group(2).decode("utf-8", "replace").strip()
        for m in _XML_FIELD.finditer(body[:_PEEK])
    }
    if not found:
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            for key in ("Code", "code", "error"):
                if isinstance(doc.get(key), str | int) and "Code" not in found:
                    found["Code"] = str(doc[key])
            for key in ("Message", "message", "msg"):
                if isinstance(doc.get(key), str) and "Message" not in found:
                    found["Message"] = doc[key][:300]
    message = _URL_IN_TEXT.sub(lambda m: shown_url(m.group(0)), found.get("Message", ""))
    return found.get("Code"), message


async def _classify_object(resp: httpx.Response, start: int, what: str) -> Body:
    """An object store's answer to a ranged GET: bytes only from a 200 or 206 that
    passes _classify_download's checks; its own errors become ours."""
    status = resp.status_code
    if status in (200, 206, 416):
        return await _classify_download(resp, start, what)
    body, _ = await _read_some(resp.aiter_raw(), _PEEK)
    code, message = _object_store_detail(body)
    message = message or f"HTTP {status}"
    shown = code or f"HTTP {status}"
    error: ApiError
    if status in (401, 403) or (status == 400 and code in _REFUSED_400):
        error = UrlRefused(shown, message, http_status=status, what=f"{what}: URL refused")
    elif status == 404:
        error = NotFound(shown, message, http_status=status, what=what)
    elif status == 429:
        error = RateLimited(message, _retry_after(resp), http_status=status, what=what)
    elif status >= 500:
        error = ServerError(shown, message, http_status=status, what=what)
    else:
        error = ApiError(shown, message, http_status=status, what=what)
    # Said as what it is: the object store's refusal, not an EnOS error code.
    error.args = (str(error).replace("EnOS error ", "object store error ", 1),)
    raise error


async def _classify_download(resp: httpx.Response, start: int, what: str) -> Body:
    status = resp.status_code
    if status == 429:
        body, _ = await _read_some(resp.aiter_raw(), _PEEK)
        raise RateLimited(
            _message(body) or "rate limit exceeded",
            _retry_after(resp),
            http_status=429,
            what=what,
        )
    length = _int(resp.headers.get("content-length"))
    if status == 416:
        _, _, total = parse_content_range(resp.headers.get("content-range"))
        await _read_some(resp.aiter_raw(), _PEEK)
        if total is None or start < total:
            raise ProtocolError(f"{what}: HTTP 416 for a range that should exist")
        return Body(start=start, length=0, total=total, ranged=True, etag=resp.headers.get("etag"))
    if status not in (200, 206):
        body, _ = await _read_some(resp.aiter_raw(), _PEEK)
        check_envelope(status, body, what, require_envelope=False)
        raise ProtocolError(f"{what}: unexpected HTTP {status}")
    prefix = b""
    chunks: AsyncIterator[bytes] | None = None
    ctype = resp.headers.get("content-type", "").lower()
    if "json" in ctype and (length is None or length <= _PEEK):
        # A failure envelope may come with 200: look before serving anything.
        chunks = resp.aiter_raw()
        prefix, complete = await _read_some(chunks, _PEEK)
        if complete:
            check_envelope(status, prefix, what, require_envelope=False)
    if status == 206:
        first, last, total = parse_content_range(resp.headers.get("content-range"))
        if first is None or last is None:
            raise ProtocolError(f"{what}: HTTP 206 without a usable Content-Range")
        if first != start:
            raise ProtocolError(f"{what}: asked for byte {start}, server sent from {first}")
        if length is not None and length != last - first + 1:
            raise ProtocolError(f"{what}: Content-Length disagrees with Content-Range")
        return Body(
            start=first,
            length=last - first + 1,
            total=total,
            ranged=True,
            etag=resp.headers.get("etag"),
            _prefix=prefix,
            _response=resp,
            _chunks=chunks,
            _what=what,
        )
    return Body(
        start=0,
        length=length,
        total=length,
        ranged=False,
        etag=resp.headers.get("etag"),
        _prefix=prefix,
        _response=resp,
        _chunks=chunks,
        _what=what,
    )
