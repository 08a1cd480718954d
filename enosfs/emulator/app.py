"""The emulator's HTTP face: the EnOS APIs of enos-api.md, as a Starlette app.

Each handler answers the way EnOS documents it: envelopes with code/msg/requestId,
failures as EnOS codes (with HTTP 200, as public samples suggest), gateway-style 401 for
bad tokens. Switches (see `Switches`) make it play the variants that are not confirmed.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import math
import os
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import asdict, dataclass, fields
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enosfs.emulator.content import GeneratedContent
from enosfs.emulator.expr import ExpressionError, compile_expression, lookup
from enosfs.emulator.faults import BODY_KINDS, Fault, FaultError, Faults
from enosfs.emulator.network import NetworkError, NetworkProfile
from enosfs.emulator.objectstore import ObjectStore, is_lark_uri
from enosfs.emulator.pacing import Pacer, chunk_for
from enosfs.emulator.ratelimit import RateLimit, RateLimitError, retry_after
from enosfs.emulator.state import (
    FEATURE_KINDS,
    Blob,
    Device,
    Firmware,
    Org,
    State,
    generated_bytes,
    now_ms,
)
from enosfs.emulator.trace import Trace
from enosfs.signature import token_signature

CHUNK = 1024 * 1024
MAX_DEVICE_PAGE = 200
# Seconds an idle connection is kept open (uvicorn's timeout_keep_alive), and said so
# in every answer's Keep-Alive header, as nginx-style gateways do: a client then knows
# how long a warm connection stays usable.
KEEP_ALIVE = 30
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class Switches:
    """Behaviours that EnOS may or may not have, settable at start and at run time."""

    token_lifetime: float = 7200.0
    honour_range: bool = True
    file_info: bool = True
    # How a bad token is answered: "gateway" (HTTP 401 {"message"}), "envelope" (code
    # 1203 with HTTP 200) or "apim" (apim_status 4011 with HTTP 200).
    token_rejection: str = "gateway"
    # Seconds a signed object-store URL (getDownloadUrl) is good for.
    lark_url_lifetime: float = 300.0
    # Whether getFileInfo answers for files kept in object storage (enos-lark://).
    lark_file_info: bool = True

    def update(self, changes: dict[str, Any]) -> None:
        known = {f.name: f.type for f in fields(self)}
        for key, value in changes.items():
            if key not in known:
                raise KeyError(key)
            current = getattr(self, key)
            if isinstance(current, bool):
                if not isinstance(value, bool):
                    raise TypeError(f"{key} takes true or false")
            elif isinstance(current, float):
                value = float(value)
            elif key == "token_rejection" and value not in ("gateway", "envelope", "apim"):
                raise TypeError("token_rejection is gateway, envelope or apim")
            setattr(self, key, value)


@dataclass
class IssuedToken:
    app_key: str
    expires_at: float


def i18n(text: str) -> dict[str, Any]:
    return {"defaultValue": text, "i18nValue": {"en_US": text}}


def envelope(data: Any = None, *, pagination: dict[str, Any] | None = None) -> JSONResponse:
    doc: dict[str, Any] = {"code": 0, "msg": "OK", "requestId": str(uuid.uuid4()), "data": data}
    if pagination is not None:
        doc["pagination"] = pagination
    return JSONResponse(doc)


def failure(code: int, msg: str, status: int = 200) -> JSONResponse:
    return JSONResponse(
        {"code": code, "msg": msg, "requestId": str(uuid.uuid4()), "data": None},
        status_code=status,
    )


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(first, last) to send, None to send everything, or 'unsatisfiable'."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # malformed or multi-range: RFC 9110 lets us send the whole body
    if not m.group(1):
        n = int(m.group(2))
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else size - 1
    if m.group(2) and last < first:
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


class InjectedCut(ConnectionAbortedError):
    """Raised to make uvicorn close a connection mid-body; not a bug, so not logged."""


class BlobResponse:
    """Streams a blob from disk (or made on demand, for a generated one) in large
    chunks: the emulator must outrun any client.

    Body faults shape the stream: cut it (reset, short), pause it (stall), pace it
    (bandwidth); so do the network profile's pacers (per connection, per link).
    """

    def __init__(
        self,
        source: str | GeneratedContent,
        first: int,
        last: int,
        status: int,
        headers: dict[str, str],
        counter: Counter[str],
        faults: list[Fault],
        stopping: asyncio.Event | None = None,
        pacers: list[Pacer] | None = None,
    ) -> None:
        self.stopping = stopping
        self.source = source
        self.pacers = pacers or []
        self.first = first
        self.last = last
        self.status = status
        self.headers = headers
        self.counter = counter
        self.faults = faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = self.last - self.first + 1
        headers = [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        if scope.get("method") == "HEAD" or length == 0:
            await send({"type": "http.response.body", "body": b""})
            return
        cut = min((f.after for f in self.faults if f.kind in ("reset", "short")), default=None)
        stalls = sorted((f.after, f.seconds) for f in self.faults if f.kind == "stall")
        rate = min((f.rate for f in self.faults if f.kind == "bandwidth"), default=0.0)
        pacers = ([Pacer(rate, chunk_for(rate, CHUNK))] if rate else []) + self.pacers
        flips = {f.after for f in self.faults if f.kind == "corrupt"}
        # A slow body trickles (small chunks, often) rather than going silent between
        # large ones: a client must tell a trickle from a stall.
        chunk_size = min((chunk_for(p.rate, CHUNK) for p in pacers), default=CHUNK)
        # A client that hangs up ends the body: a paced or stalled one would otherwise
        # go on "sending" for minutes, counted as downloaded bytes, into later tests.
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        made = self.source if isinstance(self.source, GeneratedContent) else None
        fd = os.open(self.source, os.O_RDONLY) if isinstance(self.source, str) else -1
        try:
            sent = 0
            while sent < length and not gone.is_set():
                n = min(chunk_size, length - sent)
                if cut is not None:
                    n = min(n, cut - sent)
                if stalls and stalls[0][0] > sent:
                    n = min(n, stalls[0][0] - sent)
                if stalls and stalls[0][0] <= sent:
                    self.counter["faults.stall"] += 1
                    await self._pause(stalls.pop(0)[1])
                    continue
                if cut is not None and sent >= cut:
                    self.counter["faults.cut"] += 1
                    # Closing the connection mid-body: uvicorn drops it on this error.
                    raise InjectedCut("injected: body cut")
                offset = self.first + sent
                chunk = made.read(offset, n) if made is not None else os.pread(fd, n, offset)
                if not chunk:
                    break
                for at in flips:
                    if sent <= at < sent + len(chunk):
                        self.counter["faults.corrupt"] += 1
                        spoilt = bytearray(chunk)
                        spoilt[at - sent] ^= 0xFF
                        chunk = bytes(spoilt)
                if pacers:
                    wait = max(p.reserve(len(chunk)) for p in pacers)
                    if wait > 0:
                        await self._pause(wait)
                    if gone.is_set():
                        break
                sent += len(chunk)
                self.counter["files.download.bytes"] += len(chunk)
                await send(
                    {"type": "http.response.body", "body": chunk, "more_body": sent < length}
                )
        finally:
            watcher.cancel()
            if fd >= 0:
                os.close(fd)

    async def _pause(self, seconds: float) -> None:
        """A stall or a paced body's wait, cut short when the emulator stops: neither may
        hold up its shutdown."""
        if self.stopping is None:
            await asyncio.sleep(seconds)
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        if self.stopping.is_set():
            raise InjectedCut("injected: emulator stopping")


class KeepAliveHeader:
    """Adds `Keep-Alive: timeout=KEEP_ALIVE` to every answer (uvicorn says nothing)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"keep-alive", b"timeout=%d" % KEEP_ALIVE))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_header)


def is_loopback(host: str | None) -> bool:
    """Is this address (or name) one that only this machine can reach?"""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


class Emulator:
    def __init__(
        self,
        state: State,
        switches: Switches | None = None,
        faults: Faults | None = None,
        *,
        expose_admin: bool = False,
        network: NetworkProfile | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        self.state = state
        self.switches = switches or Switches()
        self.faults = faults or Faults()
        # Held by the connection protocol too (connect cost): changed in place only.
        self.network = network or NetworkProfile()
        self.rate_limit = rate_limit
        # The admin API hands out live tokens and rewrites state: loopback clients
        # only, unless asked for (--expose-admin).
        self.expose_admin = expose_admin
        # Set when the server is told to stop, so that held replies (stalls) let go.
        self.stopping = asyncio.Event()
        self.tokens: dict[str, IssuedToken] = {}
        self.seen_signatures: set[str] = set()
        self.counts: Counter[str] = Counter()
        # Served on a socket of its own (server.py), as a real object store is elsewhere.
        self.objectstore = ObjectStore(
            state, self.switches, self.faults, self.counts, self.network, self.stopping
        )
        self.trace = Trace()

    # -- plumbing ------------------------------------------------------------------------

    def app(self) -> Starlette:
        routes = [
            Route("/apim-token-service/v2.0/token/get", self.token_get, methods=["POST"]),
            Route("/apim-token-service/v2.0/token/refresh", self.token_refresh, methods=["POST"]),
            Route("/connect-service/v2.1/files", self.files, methods=["GET", "POST", "HEAD"]),
            Route("/connect-service/v2.1/integration", self.integration, methods=["POST"]),
            Route("/connect-service/v2.1/devices", self.devices, methods=["GET", "POST"]),
            Route("/connect-service/v2.1/measurepoints", self.measurepoints, methods=["POST"]),
            Route("/connect-service/v2.1/ota-firmwares", self.firmwares, methods=["GET", "POST"]),
            Route("/model-service/v2.1/thing-models", self.thing_models, methods=["GET"]),
        ]
        admin = [
            ("health", self.health, ["GET"]),
            ("stats", self.stats, ["GET"]),
            ("stats/reset", self.stats_reset, ["POST"]),
            ("trace", self.show_trace, ["GET"]),
            ("switches", self.set_switches, ["GET", "POST"]),
            ("tokens/revoke", self.revoke_tokens, ["POST"]),
            ("faults", self.set_faults, ["GET", "POST", "DELETE"]),
            ("network", self.set_network, ["GET", "POST"]),
            ("replace", self.replace_file, ["POST"]),
            ("apps", self.set_app, ["POST"]),
            ("tokens", self.list_tokens, ["GET"]),
            ("objectstore/signatures", self.list_signatures, ["GET"]),
        ]
        for path, endpoint, methods in admin:
            routes.append(
                Route(f"/__emulator__/{path}", self._admin_only(endpoint), methods=methods)
            )
        return Starlette(routes=routes, middleware=[Middleware(KeepAliveHeader)])

    def _admin_only(
        self, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            peer = request.client.host if request.client else None
            if not self.expose_admin and not is_loopback(peer):
                return JSONResponse(
                    {"error": "the admin API answers loopback clients only (--expose-admin)"},
                    status_code=403,
                )
            return await endpoint(request)

        return guarded

    async def gate(self, request: Request, kind: str, *, auth: bool = True) -> Response | None:
        """_gate, its arrival and answer noted in the trace."""
        span = self.trace.arrived(kind)
        try:
            return await self._gate(request, kind, auth=auth)
        finally:
            self.trace.answered(span)

    async def _gate(self, request: Request, kind: str, *, auth: bool = True) -> Response | None:
        """Count the request, play the faults picked for it, check its token.

        Returns the response that answers it instead of the handler, if any. Faults that
        shape a download's body are left on request.state for the handler. The network
        profile's round trip comes first, and the rate limit's 429 takes one as well.
        """
        self.counts[kind] += 1
        limited = self.rate_limited(request) if auth else None
        if self.network.rtt > 0:
            await asyncio.sleep(self.network.rtt)
        if limited is not None:
            return limited
        picked = self.faults.pick(kind)
        request.state.body_faults = [f for f in picked if f.kind in BODY_KINDS]
        for fault in picked:
            if fault.kind == "latency":
                await asyncio.sleep(fault.seconds)
        for fault in picked:
            if fault.kind == "error":
                self.counts["faults.error"] += 1
                headers = {"retry-after": f"{fault.seconds:g}"} if fault.seconds else {}
                text = "API rate limit exceeded" if fault.status == 429 else "upstream failure"
                return JSONResponse({"message": text}, status_code=fault.status, headers=headers)
            if fault.kind == "envelope":
                self.counts["faults.envelope"] += 1
                return failure(fault.code, "Internal error (injected)", fault.status)
            if fault.kind == "deny":
                self.counts["faults.deny"] += 1
                return failure(99403, "Denied resource: the app lacks this permission")
            if fault.kind == "garbage":
                self.counts["faults.garbage"] += 1
                return Response("<html><body>502 Bad Gateway</body></html>", media_type="text/html")
            if fault.kind == "nodata":
                self.counts["faults.nodata"] += 1
                return JSONResponse({"code": 0, "msg": "OK", "requestId": str(uuid.uuid4())})
            if fault.kind == "bloat":
                self.counts["faults.bloat"] += 1
                return StreamingResponse(_bloated(fault.size), media_type="application/json")
        return self.authorize(request) if auth else None

    def rate_limited(self, request: Request) -> Response | None:
        """The gateway's 429 for a call beyond its app's limit, else None. EnOS does not
        document the body: an envelope with code 99429 (and the gateway's "message")."""
        if self.rate_limit is None:
            return None
        issued = self.tokens.get(request.headers.get("apim-accesstoken", ""))
        if issued is None:
            return None  # no app to count it against: the token check answers it
        wait = self.rate_limit.admit(issued.app_key)
        if wait is None:
            return None
        self.counts["ratelimit.429"] += 1
        msg = f"API rate limit exceeded: at most {self.rate_limit.describe()} for this app"
        return JSONResponse(
            {
                "code": 99429,
                "msg": msg,
                "message": msg,
                "requestId": str(uuid.uuid4()),
                "data": None,
            },
            status_code=429,
            headers={"retry-after": retry_after(wait)},
        )

    def authorize(self, request: Request) -> Response | None:
        token = request.headers.get("apim-accesstoken", "")
        issued = self.tokens.get(token)
        if issued is not None and issued.expires_at > time.monotonic():
            return None
        self.counts["auth.rejected"] += 1
        style = self.switches.token_rejection
        if style == "envelope":
            return failure(1203, "access token expired")
        if style == "apim":
            return JSONResponse({"apim_status": 4011, "msg": "token expired", "data": None})
        return JSONResponse({"message": "Invalid authentication credentials"}, status_code=401)

    def org(self, request: Request) -> Org | Response:
        org_id = request.query_params.get("orgId")
        if not org_id:
            return failure(99400, "Invalid Argument orgId: orgId is required")
        org = self.state.orgs.get(org_id)
        if org is None:
            return failure(99400, "Invalid Argument orgId: orgId does not exist")
        return org

    async def enter(self, request: Request, service: str) -> tuple[str, Org] | Response:
        """An API call's action and organisation, once the gate lets it through: what
        every service's handler starts with."""
        action = request.query_params.get("action", "")
        blocked = await self.gate(request, f"{service}.{action}")
        if blocked is not None:
            return blocked
        org = self.org(request)
        if isinstance(org, Response):
            return org
        return action, org

    def device(self, org: Org, request: Request) -> Device | Response:
        q = request.query_params
        if q.get("assetId"):
            d = org.devices.get(q["assetId"])
        elif q.get("productKey") and q.get("deviceKey"):
            d = org.device_by_key(q["productKey"], q["deviceKey"])
        else:
            return failure(99400, "Invalid Argument: assetId or productKey+deviceKey is required")
        if d is None:
            return failure(99404, "Object does not exist: device not found")
        return d

    async def json_body(self, request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        if not raw:
            return {}
        try:
            doc = json.loads(raw)
        except ValueError:
            return failure(99400, "Invalid Argument: request body is not JSON")
        if not isinstance(doc, dict):
            return failure(99400, "Invalid Argument: request body must be a JSON object")
        return doc

    # -- admin ---------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def stats(self, request: Request) -> Response:
        doc: dict[str, Any] = {
            "requests": dict(self.counts),
            "objectstore": self.objectstore.stats(),
        }
        if self.rate_limit is not None:
            # The most calls (refused ones included) one app made in any window.
            doc["rate_limit"] = {
                "limit": self.rate_limit.describe(),
                "peak_seen": self.rate_limit.peak_seen,
            }
        return JSONResponse(doc)

    async def stats_reset(self, request: Request) -> Response:
        self.counts.clear()
        self.trace.reset()
        if self.rate_limit is not None:
            self.rate_limit.reset_peak()
        return JSONResponse({"ok": True})

    async def show_trace(self, request: Request) -> Response:
        return JSONResponse(self.trace.describe())

    async def set_switches(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self.switches.update(json.loads(await request.body() or b"{}"))
            except (KeyError, TypeError, ValueError) as exc:
                return JSONResponse({"error": f"bad switch: {exc}"}, status_code=400)
        return JSONResponse(asdict(self.switches))

    async def set_faults(self, request: Request) -> Response:
        """POST {"faults": [{"kind": ..., ...}], "seed": N} replaces the faults; DELETE
        clears them; GET shows them and how often each kind fired."""
        if request.method == "DELETE":
            self.faults.replace([])
        elif request.method == "POST":
            try:
                doc = json.loads(await request.body() or b"{}")
                faults = [Fault.from_dict(d) for d in doc.get("faults", [])]
                seed = doc.get("seed")
                self.faults.replace(faults, None if seed is None else int(seed))
            except (FaultError, ValueError, TypeError, AttributeError) as exc:
                return JSONResponse({"error": f"bad faults: {exc}"}, status_code=400)
        return JSONResponse(self.faults.describe())

    async def set_network(self, request: Request) -> Response:
        """POST {"network": "rtt=40ms,conn=25MB/s" (or "" for none), "rate_limit": "50/s"
        (or null for none)}: either key may be left out; GET shows both."""
        if request.method == "POST":
            try:
                doc = json.loads(await request.body() or b"{}")
                if "network" in doc:
                    self.network.replace_with(NetworkProfile.from_spec(str(doc["network"] or "")))
                if "rate_limit" in doc:
                    spec = doc["rate_limit"]
                    self.rate_limit = RateLimit.from_spec(str(spec)) if spec else None
            except (NetworkError, RateLimitError, ValueError, TypeError, AttributeError) as exc:
                return JSONResponse({"error": f"bad network: {exc}"}, status_code=400)
        return JSONResponse(
            {
                "network": self.network.describe(),
                "rate_limit": self.rate_limit.describe() if self.rate_limit else None,
            }
        )

    async def replace_file(self, request: Request) -> Response:
        """Give an asset's feature new content, as a device uploading a new file does.

        Body: {"orgId", "assetId", "feature", "kind": "attributes"|"measurepoints",
        "text": ... | "bytes": N, "seed": S, "name": ..., "keep_uri": false}. With
        keep_uri the fileUri stays and only the bytes (and md5) change.
        """
        try:
            doc = json.loads(await request.body())
            org = self.state.orgs[doc["orgId"]]
            device = org.devices[doc["assetId"]]
            kind, ident = doc.get("kind", "attributes"), doc["feature"]
            if "text" in doc:
                data = str(doc["text"]).encode()
            else:
                data = generated_bytes(int(doc["bytes"]), str(doc.get("seed", ident)))
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"bad replace request: {exc}"}, status_code=400)
        current = (
            device.attributes.get(ident)
            if kind == "attributes"
            else (device.measurepoints.get(ident) or [0, None])[1]
        )
        name = doc.get("name") or f"{ident}.bin"
        uri = current if doc.get("keep_uri") and isinstance(current, str) else None
        blob = self.state.store(org.org_id, "feature", data, name, uri=uri)
        if kind == "attributes":
            device.attributes[ident] = blob.uri
        else:
            device.measurepoints[ident] = [now_ms(), blob.uri]
        self.state.save()
        return JSONResponse({"fileUri": blob.uri, "md5": blob.md5, "size": blob.size})

    async def set_app(self, request: Request) -> Response:
        """POST {"appKey", "appSecret"}: add an app or change its secret (a rotation)."""
        try:
            doc = json.loads(await request.body())
            self.state.apps[str(doc["appKey"])] = str(doc["appSecret"])
        except (KeyError, ValueError, TypeError) as exc:
            return JSONResponse({"error": f"bad app: {exc}"}, status_code=400)
        return JSONResponse({"ok": True})

    async def list_tokens(self, request: Request) -> Response:
        """The tokens issued so far, so tests can check they never reach a log."""
        return JSONResponse({"tokens": list(self.tokens)})

    async def list_signatures(self, request: Request) -> Response:
        """The signatures of the object-store URLs handed out so far (the last few
        thousand): as secret as tokens, and checked for in logs the same way."""
        return JSONResponse({"signatures": list(self.objectstore.issued)})

    async def revoke_tokens(self, request: Request) -> Response:
        self.tokens.clear()
        return JSONResponse({"ok": True})

    # -- tokens --------------------------------------------------------------------------

    def _token_answer(self, status: int, msg: str, data: Any = None) -> JSONResponse:
        return JSONResponse(
            {"status": status, "msg": msg, "business": "apim-token-service", "data": data}
        )

    def _check_signature(self, body: dict[str, Any]) -> JSONResponse | str:
        key, enc, ts = body.get("appKey"), body.get("encryption"), body.get("timestamp")
        if not key or not enc or ts in (None, ""):
            return self._token_answer(1202, "parameter empty")
        if not isinstance(key, str) or not isinstance(enc, str):
            return self._token_answer(1004, "invalid parameter")
        secret = self.state.apps.get(key)
        if secret is None:
            return self._token_answer(1002, "appKey does not exist")
        if enc.lower() != token_signature(key, str(ts), secret):
            return self._token_answer(1003, "encryption invalid")
        if enc in self.seen_signatures:
            return self._token_answer(1001, "duplicated encryption")
        self.seen_signatures.add(enc)
        return key

    def _issue(self, key: str) -> JSONResponse:
        token = secrets.token_hex(16)
        lifetime = self.switches.token_lifetime
        self.tokens[token] = IssuedToken(key, time.monotonic() + lifetime)
        return self._token_answer(
            0, "Success", {"accessToken": token, "expire": math.ceil(lifetime)}
        )

    def _forget_expired(self) -> None:
        now = time.monotonic()
        for t in [t for t, i in self.tokens.items() if i.expires_at <= now]:
            del self.tokens[t]

    async def _signed(self, request: Request, kind: str) -> tuple[dict[str, Any], str] | Response:
        """A token request's body and its app key, once the gate and the signature pass."""
        blocked = await self.gate(request, kind, auth=False)
        if blocked is not None:
            return blocked
        body = await self.json_body(request)
        if isinstance(body, Response):
            return self._token_answer(1004, "invalid parameter")
        checked = self._check_signature(body)
        if isinstance(checked, Response):
            return checked
        return body, checked

    async def token_get(self, request: Request) -> Response:
        signed = await self._signed(request, "token.get")
        if isinstance(signed, Response):
            return signed
        _, checked = signed
        self._forget_expired()
        now = time.monotonic()
        for token, issued in self.tokens.items():
            if issued.app_key == checked:
                remaining = max(1, math.floor(issued.expires_at - now))
                return self._token_answer(0, "Success", {"accessToken": token, "expire": remaining})
        return self._issue(checked)

    async def token_refresh(self, request: Request) -> Response:
        signed = await self._signed(request, "token.refresh")
        if isinstance(signed, Response):
            return signed
        body, checked = signed
        old = self.tokens.get(str(body.get("accessToken", "")))
        if old is None or old.app_key != checked or old.expires_at <= time.monotonic():
            return self._token_answer(1203, "access token expired")
        return self._issue(checked)

    # -- files ---------------------------------------------------------------------------

    def _blob_for(self, org: Org, request: Request) -> Blob | Response:
        q = request.query_params
        uri, category = q.get("fileUri"), q.get("category")
        if not uri:
            return failure(99400, "Invalid Argument fileUri: fileUri is required")
        if category not in ("feature", "ota"):
            return failure(99400, "Invalid Argument category: must be feature or ota")
        blob = self.state.blobs.get(uri)
        if blob is None or blob.org_id != org.org_id or blob.category != category:
            return failure(99404, "Object does not exist: file not found")
        return blob

    async def files(self, request: Request) -> Response:
        entered = await self.enter(request, "files")
        if isinstance(entered, Response):
            return entered
        action, org = entered
        device = self.device(org, request)
        if isinstance(device, Response):
            return device
        if action == "download":
            return self._download(org, request, request.state.body_faults)
        if action == "getDownloadUrl":
            blob = self._blob_for(org, request)
            if isinstance(blob, Response):
                return blob
            if not is_lark_uri(blob.uri):
                return failure(
                    99400,
                    "Invalid Argument fileUri: only files kept in object storage "
                    "(enos-lark://) have a download URL",
                )
            return envelope(self.objectstore.url_for(blob))
        if action == "getFileInfo":
            if not self.switches.file_info:
                return failure(99400, "Invalid Argument action: unsupported action getFileInfo")
            blob = self._blob_for(org, request)
            if isinstance(blob, Response):
                return blob
            if is_lark_uri(blob.uri) and not self.switches.lark_file_info:
                return failure(
                    99400, "Invalid Argument fileUri: getFileInfo does not know enos-lark files"
                )
            self.state.settle(blob)
            return envelope(
                {
                    "orgId": blob.org_id,
                    "category": blob.category,
                    "fileUri": blob.uri,
                    "originalFilename": blob.original_name,
                    "fileSize": blob.size,
                    "md5": blob.md5,
                    "signMethod": blob.sign_method,
                    "sign": blob.sign,
                    "createTime": blob.create_time_ms,
                }
            )
        if action == "delete" and request.method == "POST":
            blob = self._blob_for(org, request)
            if isinstance(blob, Response):
                return blob
            self.state.delete_blob(blob.uri)
            self.state.save()
            return envelope({})
        return failure(99400, f"Invalid Argument action: {action}")

    def _download(self, org: Org, request: Request, faults: list[Fault]) -> Any:
        blob = self._blob_for(org, request)
        if isinstance(blob, Response):
            return blob
        if is_lark_uri(blob.uri):
            # As EnOS's SDK implies: such a file is read through its download URL only.
            self.counts["files.download.lark_refused"] += 1
            return failure(
                99400,
                "Invalid Argument fileUri: a file kept in object storage (enos-lark://) is "
                "read through action=getDownloadUrl",
            )
        self.state.settle(blob)
        size = blob.size
        headers = {
            "content-type": "application/octet-stream",
            "accept-ranges": "bytes" if self.switches.honour_range else "none",
            "etag": f'"{blob.md5}"',
        }
        wanted = parse_range(request.headers.get("range"), size)
        if not self.switches.honour_range:
            wanted = None
        source = blob.content or str(self.state.blob_path(blob))
        if isinstance(wanted, str):  # "unsatisfiable"
            self.counts["files.download.416"] += 1
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
        pacers = self.network.pacers()
        if wanted is None:
            self.counts["files.download.full"] += 1
            return BlobResponse(
                source, 0, size - 1, 200, headers, self.counts, faults, self.stopping, pacers
            )
        first, last = wanted
        self.counts["files.download.ranged"] += 1
        headers["content-range"] = f"bytes {first}-{last}/{size}"
        return BlobResponse(
            source, first, last, 206, headers, self.counts, faults, self.stopping, pacers
        )

    # -- integration (upload) ------------------------------------------------------------

    async def integration(self, request: Request) -> Response:
        entered = await self.enter(request, "integration")
        if isinstance(entered, Response):
            return entered
        action, org = entered
        kinds = {
            "postAttribute": "attributes",
            "postMeasurepoint": "measurepoints",
            "postEvent": "events",
        }
        if action not in kinds:
            return failure(99400, f"Invalid Argument action: {action}")
        kind = kinds[action]
        form = await request.form(max_part_size=1024 * 1024)
        raw = form.get("enos-message")
        if not isinstance(raw, str):
            return failure(99400, "Invalid Argument: missing enos-message part")
        if len(raw.encode()) > 512 * 1024:
            return failure(99400, "Invalid Argument: enos-message is larger than 512 KB")
        try:
            message = json.loads(raw)
        except ValueError:
            return failure(99400, "Invalid Argument: enos-message is not JSON")
        uploads: dict[str, bytes] = {}
        for _, part in form.multi_items():
            if isinstance(part, UploadFile) and part.filename:
                data = await part.read()
                if len(data) > 100 * 1024 * 1024:
                    return failure(99400, f"Invalid Argument: {part.filename} exceeds 100 MB")
                uploads[part.filename] = data
        files_meta = message.get("files") or {}
        params = message.get("params")
        if not isinstance(params, list):
            return failure(99400, "Invalid Argument: params must be an array")
        staged: list[tuple[Device, str, Any, int]] = []
        for p in params:
            if not isinstance(p, dict):
                return failure(99400, "Invalid Argument: each param must be an object")
            device = org.devices.get(p.get("assetId", "")) or org.device_by_key(
                str(p.get("productKey", "")), str(p.get("deviceKey", ""))
            )
            if device is None:
                return failure(99404, "Object does not exist: device not found")
            values = p.get(kind) or {}
            model = org.models[device.model_id]
            for ident, value in values.items():
                dtype = model.features.get(kind, {}).get(ident)
                if dtype is None:
                    return failure(99400, f"Invalid Argument: {ident} is not in the model")
                if isinstance(value, str) and value.startswith("local://"):
                    if dtype != "FILE":
                        return failure(99400, f"Invalid Argument: {ident} is not a FILE feature")
                    name = value[len("local://") :]
                    if name not in uploads:
                        return failure(99400, f"Invalid Argument: no enos-file part {name}")
                    want_md5 = (files_meta.get(name) or {}).get("md5")
                    if want_md5 and hashlib.md5(uploads[name]).hexdigest() != want_md5.lower():
                        return failure(99400, f"Invalid Argument: md5 mismatch for {name}")
                staged.append((device, ident, value, int(p.get("time") or now_ms())))
        for device, ident, value, ts in staged:
            if isinstance(value, str) and value.startswith("local://"):
                name = value[len("local://") :]
                original = (files_meta.get(name) or {}).get("originalFilename") or name
                blob = self.state.store(org.org_id, "feature", uploads[name], original)
                value = blob.uri
            if kind == "attributes":
                device.attributes[ident] = value
            elif kind == "measurepoints":
                device.measurepoints[ident] = [ts, value]
        self.state.save()
        return envelope({})

    # -- devices, models, measurement points ---------------------------------------------

    def device_doc(self, org: Org, d: Device) -> dict[str, Any]:
        product = org.products[d.product_key]
        return {
            "orgId": org.org_id,
            "assetId": d.asset_id,
            "modelId": d.model_id,
            "modelIdPath": f"/{d.model_id}",
            "productKey": d.product_key,
            "productName": i18n(product.name),
            "productType": "Device",
            "dataFormat": "Json",
            "deviceKey": d.device_key,
            "deviceName": i18n(d.name),
            "deviceDesc": None,
            "timezone": "+00:00",
            "deviceAttributes": dict(d.attributes),
            "deviceTags": {},
            "createTime": d.create_time_ms,
            "status": "online",
        }

    async def devices(self, request: Request) -> Response:
        entered = await self.enter(request, "devices")
        if isinstance(entered, Response):
            return entered
        action, org = entered
        if action == "get":
            d = self.device(org, request)
            if isinstance(d, Response):
                return d
            return envelope(self.device_doc(org, d))
        if action != "search" or request.method != "POST":
            return failure(99400, f"Invalid Argument action: {action}")
        body = await self.json_body(request)
        if isinstance(body, Response):
            return body
        try:
            pred = compile_expression(body.get("expression"))
        except ExpressionError as exc:
            return failure(99400, f"Invalid Argument expression: {exc}")
        devices = sorted(org.devices.values(), key=lambda d: d.create_time_ms, reverse=True)
        if body.get("expression"):
            docs = [doc for doc in (self.device_doc(org, d) for d in devices) if pred(doc)]
            return self._page(docs, body, MAX_DEVICE_PAGE)
        # No filter: build documents for the page asked for only (10,000-asset orgs).
        return self._page(devices, body, MAX_DEVICE_PAGE, render=lambda d: self.device_doc(org, d))

    def _page(
        self,
        docs: list[Any],
        body: dict[str, Any],
        max_size: int,
        render: Callable[[Any], dict[str, Any]] | None = None,
    ) -> Response:
        pagination = body.get("pagination") or {}
        try:
            page_no = int(pagination.get("pageNo", 1))
            page_size = int(pagination.get("pageSize", 10))
        except (TypeError, ValueError):
            return failure(99400, "Invalid Argument pagination")
        if page_no < 1 or page_size < 1 or page_size > max_size:
            return failure(99400, f"Invalid Argument pagination: pageSize must be 1..{max_size}")
        chosen = docs[(page_no - 1) * page_size : page_no * page_size]
        if render is not None:
            chosen = [render(item) for item in chosen]
        projection = body.get("projection")
        if isinstance(projection, list) and projection:
            chosen = [_project(doc, [str(p) for p in projection]) for doc in chosen]
        return envelope(
            chosen,
            pagination={
                "sortedBy": None,
                "pageNo": page_no,
                "pageSize": page_size,
                "totalSize": len(docs),
            },
        )

    async def thing_models(self, request: Request) -> Response:
        entered = await self.enter(request, "thing-models")
        if isinstance(entered, Response):
            return entered
        action, org = entered
        if action != "get":
            return failure(99400, f"Invalid Argument action: {action}")
        model = org.models.get(request.query_params.get("modelId", ""))
        if model is None:
            return failure(99404, "Object does not exist: model not found")
        doc: dict[str, Any] = {
            "modelId": model.model_id,
            "modelIdPath": f"/{model.model_id}",
            "orgId": org.org_id,
            "name": i18n(model.name),
            "desc": "",
            "tags": {},
            "services": {},
        }
        for kind in FEATURE_KINDS:
            section: dict[str, Any] = {}
            for ident, dtype in model.features.get(kind, {}).items():
                item: dict[str, Any] = {
                    "identifier": ident,
                    "name": i18n(ident),
                    "desc": "",
                    "tags": {},
                }
                if kind == "events":
                    item["outputData"] = [
                        {"identifier": ident, "name": i18n(ident), "dataType": dtype, "unit": None}
                    ]
                    item["eventType"] = "INFO"
                else:
                    item.update(
                        {
                            "dataType": dtype,
                            "dataDefinition": None,
                            "unit": None,
                            "isStdElement": False,
                            "stdElementId": None,
                        }
                    )
                section[ident] = item
            doc[kind] = section
        return envelope(doc)

    async def measurepoints(self, request: Request) -> Response:
        entered = await self.enter(request, "measurepoints")
        if isinstance(entered, Response):
            return entered
        action, org = entered
        if action != "queryLatest":
            return failure(99400, f"Invalid Argument action: {action}")
        d = self.device(org, request)
        if isinstance(d, Response):
            return d
        body = await self.json_body(request)
        if isinstance(body, Response):
            return body
        ids = body.get("measurepointIds")
        wanted = set(ids) if isinstance(ids, list) and ids else set(d.measurepoints)
        data = [
            {"id": mp, "time": str(d.measurepoints[mp][0]), "value": d.measurepoints[mp][1]}
            for mp in sorted(wanted)
            if mp in d.measurepoints
        ]
        return envelope(data)

    # -- firmware ------------------------------------------------------------------------

    def firmware_doc(self, org: Org, f: Firmware) -> dict[str, Any]:
        if not f.sign and f.file_uri in self.state.blobs:  # generated: signed when shown
            f.sign = self.state.settle(self.state.blobs[f.file_uri]).sign
        return {
            "orgId": org.org_id,
            "firmwareId": f.firmware_id,
            "productKey": f.product_key,
            "name": i18n(f.name),
            "version": f.version,
            "desc": f.desc or None,
            "signMethod": f.sign_method,
            "sign": f.sign,
            "fileUrl": f.file_uri,
            "fileSize": f.size,
            "enableVerification": False,
            "isVerified": False,
            "createTime": f.create_time_ms,
            "firmwareTags": {},
        }

    async def firmwares(self, request: Request) -> Response:
        entered = await self.enter(request, "ota-firmwares")
        if isinstance(entered, Response):
            return entered
        action, org = entered
        if action == "get":
            f = org.firmwares.get(request.query_params.get("firmwareId", ""))
            if f is None:
                return failure(24404, "Firmware not found")
            return envelope(self.firmware_doc(org, f))
        if action == "search" and request.method == "POST":
            body = await self.json_body(request)
            if isinstance(body, Response):
                return body
            try:
                pred = compile_expression(body.get("expression"))
            except ExpressionError as exc:
                return failure(99400, f"Invalid Argument expression: {exc}")
            docs = [self.firmware_doc(org, f) for f in org.firmwares.values()]
            docs = [doc for doc in docs if pred(doc)]
            docs.sort(key=lambda doc: doc["createTime"], reverse=True)
            return self._page(docs, body, 100)
        if action == "create" and request.method == "POST":
            return await self._create_firmware(org, request)
        return failure(99400, f"Invalid Argument action: {action}")

    async def _create_firmware(self, org: Org, request: Request) -> Response:
        product_key = request.query_params.get("productKey", "")
        if product_key not in org.products:
            return failure(99400, "Invalid Argument productKey: product does not exist")
        form = await request.form(max_part_size=1024 * 1024)
        try:
            meta = json.loads(str(form.get("metadata") or ""))
        except ValueError:
            return failure(99400, "Invalid Argument: metadata is not JSON")
        upload = form.get("file")
        if not isinstance(meta, dict) or upload is None or isinstance(upload, str):
            return failure(99400, "Invalid Argument: metadata and file parts are required")
        name = meta.get("name")
        name = name.get("defaultValue") if isinstance(name, dict) else name
        version, method = meta.get("version"), str(meta.get("signMethod", "")).lower()
        if not name or not version or method not in ("md5", "sha256"):
            return failure(99400, "Invalid Argument: name, version and signMethod are required")
        for f in org.firmwares.values():
            if f.product_key == product_key and f.version == version:
                return failure(24601, "Firmware version already exists")
        data = await upload.read()
        digest = hashlib.new(method, data).hexdigest()
        if str(meta.get("sign", "")).lower() != digest:
            return failure(99400, "Invalid Argument sign: does not match the file")
        blob = self.state.store(
            org.org_id, "ota", data, upload.filename or "firmware.bin", sign_method=method
        )
        fid = secrets.token_hex(12)
        org.firmwares[fid] = Firmware(
            firmware_id=fid,
            product_key=product_key,
            name=str(name),
            version=str(version),
            file_uri=blob.uri,
            size=blob.size,
            sign_method=method,
            sign=blob.sign,
            create_time_ms=blob.create_time_ms,
            desc=str(meta.get("desc") or ""),
        )
        self.state.save()
        return envelope({"firmwareId": fid})


async def _bloated(size: int) -> Any:
    """A success envelope with `size` blanks inside: valid JSON, and huge."""
    yield b'{"code": 0, "msg": "OK", "requestId": "bloat", "data": {}'
    blanks = b" " * CHUNK
    while size > 0:
        yield blanks[: min(size, CHUNK)]
        size -= CHUNK
    yield b"}"


def _project(doc: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """Keep only the dotted paths asked for, with just enough of their parents."""
    out: dict[str, Any] = {}
    for path in paths:
        found, value = lookup(doc, path) if "." in path else (path in doc, doc.get(path))
        if not found:
            continue
        if "." not in path:
            out[path] = doc[path]
            continue
        parts = path.split(".")
        cur = out
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
    return out
