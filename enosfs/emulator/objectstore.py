"""The emulator's object store: where files kept as `enos-lark://` are read from.

EnOS answers `getDownloadUrl` for such a file with a pre-signed URL on another host;
this is that host, on a port of its own. A URL is signed (HMAC-SHA256 with a secret
made for this run, over the object's key, the signing time and the lifetime) in S3's
query style (X-Amz-Date, X-Amz-Expires, X-Amz-Signature), and refused once expired.
It answers as an object store does, not as EnOS: Range gives 206 with Content-Range,
every answer carries an ETag, and refusals are XML error documents (403 AccessDenied,
403 SignatureDoesNotMatch, 404 NoSuchKey, 503 SlowDown). The access token is neither
needed nor wanted here: every request that carries one anyway is counted
(`objectstore.with_token`), so tests can show the client never sends it.

Faults whose pattern matches `objectstore.get` apply: latency, error (its status
answered as the object store would), deny (403), expired (a good URL refused as
expired) and the body faults (reset, short, stall, bandwidth, corrupt).
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import hmac
import math
import secrets
import time
import uuid
from collections import Counter, deque
from typing import TYPE_CHECKING, Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from enosfs.emulator.faults import BODY_KINDS, Faults
from enosfs.emulator.state import Blob, State

if TYPE_CHECKING:
    from enosfs.emulator.app import Switches
    from enosfs.emulator.network import NetworkProfile

LARK_SCHEME = "enos-lark://"
PATH = "/lark/"
KIND = "objectstore.get"
_DATE = "%Y%m%dT%H%M%SZ"
_REASONS = {
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    429: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


def is_lark_uri(uri: str) -> bool:
    return uri.startswith(LARK_SCHEME)


def error_xml(status: int, code: str, message: str, **extra: str) -> Response:
    """An error answer the way S3 writes one."""
    fields = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in extra.items())
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>{fields}"
        f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
    )
    return Response(body, status_code=status, media_type="application/xml")


class ObjectStore:
    """Signs URLs for the EnOS side (url_for) and serves them (app)."""

    def __init__(
        self,
        state: State,
        switches: Switches,
        faults: Faults,
        counts: Counter[str],
        network: NetworkProfile,
        stopping: asyncio.Event,
    ) -> None:
        self.state = state
        self.switches = switches
        self.faults = faults
        self.counts = counts
        self.network = network
        self.stopping = stopping
        self.secret = secrets.token_bytes(32)  # per run: a restart voids every URL
        self.base_url = ""  # scheme://host:port, set once its socket is bound
        # Signatures handed out, newest last (bounded): tests look for them in logs.
        self.issued: deque[str] = deque(maxlen=4096)

    def stats(self) -> dict[str, Any]:
        return {
            "url": self.base_url,
            "requests": self.counts[KIND],
            "with_token": self.counts["objectstore.with_token"],
        }

    # -- signing -------------------------------------------------------------------------

    def _signature(self, key: str, date: str, expires: str) -> str:
        text = f"GET\n{key}\n{date}\n{expires}".encode()
        return hmac.new(self.secret, text, hashlib.sha256).hexdigest()

    def url_for(self, blob: Blob) -> str:
        """A URL good for switches.lark_url_lifetime seconds (whole seconds, at least
        one, as X-Amz-Expires is)."""
        key = blob.uri[len(LARK_SCHEME) :]
        date = time.strftime(_DATE, time.gmtime())
        expires = str(max(1, math.ceil(self.switches.lark_url_lifetime)))
        signature = self._signature(key, date, expires)
        self.issued.append(signature)
        return (
            f"{self.base_url}{PATH}{quote(key)}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Date={date}&X-Amz-Expires={expires}&X-Amz-Signature={signature}"
        )

    def _refusal(self, key: str, request: Request) -> Response | None:
        q = request.query_params
        date, expires, given = q.get("X-Amz-Date"), q.get("X-Amz-Expires"), q.get("X-Amz-Signature")
        if not date or not expires or not given:
            return error_xml(
                403,
                "AccessDenied",
                "Query-string authentication requires the "
                "X-Amz-Date, X-Amz-Expires and X-Amz-Signature parameters",
            )
        if not hmac.compare_digest(self._signature(key, date, expires), given):
            self.counts["objectstore.bad_signature"] += 1
            # As S3 does: the refusal repeats what it was given (a client must not log it).
            return error_xml(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
                SignatureProvided=given,
            )
        try:
            signed = calendar.timegm(time.strptime(date, _DATE))
            lifetime = int(expires)
        except (ValueError, OverflowError):
            return error_xml(400, "AuthorizationQueryParametersError", "X-Amz-Date is malformed")
        if time.time() > signed + lifetime:
            return self._expired(date, expires)
        return None

    def _expired(self, date: str, expires: str) -> Response:
        self.counts["objectstore.expired"] += 1
        return error_xml(
            403,
            "AccessDenied",
            "Request has expired",
            **{"X-Amz-Expires": expires, "Expires": date, "ServerTime": time.strftime(_DATE)},
        )

    # -- serving -------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(routes=[Route(PATH + "{key:path}", self.get, methods=["GET", "HEAD"])])

    async def get(self, request: Request) -> Any:
        from enosfs.emulator.app import BlobResponse, parse_range

        self.counts[KIND] += 1
        if "apim-accesstoken" in request.headers:
            self.counts["objectstore.with_token"] += 1
        if self.network.rtt > 0:
            await asyncio.sleep(self.network.rtt)
        picked = self.faults.pick(KIND)
        for fault in picked:
            if fault.kind == "latency":
                await asyncio.sleep(fault.seconds)
        key = request.path_params["key"]
        for fault in picked:
            if fault.kind == "expired":
                q = request.query_params
                return self._expired(q.get("X-Amz-Date", ""), q.get("X-Amz-Expires", ""))
            if fault.kind in ("error", "deny"):
                status = 403 if fault.kind == "deny" else fault.status
                self.counts[f"objectstore.faults.{status}"] += 1
                code, message = _REASONS.get(status, ("InternalError", f"HTTP {status}"))
                response = error_xml(status, code, message)
                if fault.seconds:
                    response.headers["retry-after"] = f"{fault.seconds:g}"
                return response
        refused = self._refusal(key, request)
        if refused is not None:
            return refused
        blob = self.state.blobs.get(LARK_SCHEME + key)
        if blob is None:
            return error_xml(404, "NoSuchKey", "The specified key does not exist.", Key=key)
        self.state.settle(blob)
        size = blob.size
        headers = {
            "content-type": "application/octet-stream",
            "accept-ranges": "bytes",
            "etag": f'"{blob.md5}"',
        }
        wanted = parse_range(request.headers.get("range"), size)
        if isinstance(wanted, str):  # unsatisfiable
            response = error_xml(416, "InvalidRange", "The requested range is not satisfiable")
            response.headers["content-range"] = f"bytes */{size}"
            return response
        source = blob.content or str(self.state.blob_path(blob))
        faults = [f for f in picked if f.kind in BODY_KINDS]
        pacers = self.network.pacers()
        if wanted is None:
            first, last, status = 0, size - 1, 200
        else:
            first, last, status = wanted[0], wanted[1], 206
            headers["content-range"] = f"bytes {first}-{last}/{size}"
        return BlobResponse(
            source, first, last, status, headers, self.counts, faults, self.stopping, pacers
        )
