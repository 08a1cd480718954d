"""The emulator's HTTP face: the EnOS APIs of enos-api.md, as a Starlette app.

Each handler answers the way EnOS documents it: envelopes with code/msg/requestId,
failures as EnOS codes (with HTTP 200, as public samples suggest), gateway-style 401 for
bad tokens. Switches (see `Switches`) make it play the variants that are not confirmed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from enosfs.emulator.expr import ExpressionError, compile_expression, lookup
from enosfs.emulator.state import FEATURE_KINDS, Blob, Device, Firmware, Org, State, now_ms
from enosfs.signature import token_signature

CHUNK = 1024 * 1024
MAX_DEVICE_PAGE = 200
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class Switches:
    """Behaviours that EnOS may or may not have, settable at start and at run time."""

    token_lifetime: float = 7200.0
    honour_range: bool = True
    file_info: bool = True

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


class BlobResponse:
    """Streams a blob from disk in large chunks: the emulator must outrun any client."""

    def __init__(
        self,
        path: str,
        first: int,
        last: int,
        status: int,
        headers: dict[str, str],
        counter: Counter[str],
    ) -> None:
        self.path = path
        self.first = first
        self.last = last
        self.status = status
        self.headers = headers
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = self.last - self.first + 1
        headers = [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        if scope.get("method") == "HEAD" or length == 0:
            await send({"type": "http.response.body", "body": b""})
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pos = self.first
            end = self.last + 1
            while pos < end:
                chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                if not chunk:
                    break
                pos += len(chunk)
                self.counter["files.download.bytes"] += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": pos < end})
        finally:
            os.close(fd)


class Emulator:
    def __init__(self, state: State, switches: Switches | None = None) -> None:
        self.state = state
        self.switches = switches or Switches()
        self.tokens: dict[str, IssuedToken] = {}
        self.seen_signatures: set[str] = set()
        self.counts: Counter[str] = Counter()

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
            Route("/__emulator__/health", self.health, methods=["GET"]),
            Route("/__emulator__/stats", self.stats, methods=["GET"]),
            Route("/__emulator__/stats/reset", self.stats_reset, methods=["POST"]),
            Route("/__emulator__/switches", self.set_switches, methods=["GET", "POST"]),
            Route("/__emulator__/tokens/revoke", self.revoke_tokens, methods=["POST"]),
        ]
        return Starlette(routes=routes)

    def authorize(self, request: Request) -> Response | None:
        token = request.headers.get("apim-accesstoken", "")
        issued = self.tokens.get(token)
        if issued is None or issued.expires_at <= time.monotonic():
            self.counts["auth.rejected"] += 1
            return JSONResponse({"message": "Invalid authentication credentials"}, status_code=401)
        return None

    def org(self, request: Request) -> Org | Response:
        org_id = request.query_params.get("orgId")
        if not org_id:
            return failure(99400, "Invalid Argument orgId: orgId is required")
        org = self.state.orgs.get(org_id)
        if org is None:
            return failure(99400, "Invalid Argument orgId: orgId does not exist")
        return org

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
        return JSONResponse({"requests": dict(self.counts)})

    async def stats_reset(self, request: Request) -> Response:
        self.counts.clear()
        return JSONResponse({"ok": True})

    async def set_switches(self, request: Request) -> Response:
        if request.method == "POST":
            try:
                self.switches.update(json.loads(await request.body() or b"{}"))
            except (KeyError, TypeError, ValueError) as exc:
                return JSONResponse({"error": f"bad switch: {exc}"}, status_code=400)
        return JSONResponse(asdict(self.switches))

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

    async def token_get(self, request: Request) -> Response:
        self.counts["token.get"] += 1
        body = await self.json_body(request)
        if isinstance(body, Response):
            return self._token_answer(1004, "invalid parameter")
        checked = self._check_signature(body)
        if isinstance(checked, Response):
            return checked
        self._forget_expired()
        now = time.monotonic()
        for token, issued in self.tokens.items():
            if issued.app_key == checked:
                remaining = max(1, math.floor(issued.expires_at - now))
                return self._token_answer(0, "Success", {"accessToken": token, "expire": remaining})
        return self._issue(checked)

    async def token_refresh(self, request: Request) -> Response:
        self.counts["token.refresh"] += 1
        body = await self.json_body(request)
        if isinstance(body, Response):
            return self._token_answer(1004, "invalid parameter")
        checked = self._check_signature(body)
        if isinstance(checked, Response):
            return checked
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
        action = request.query_params.get("action")
        kind = f"files.{action}"
        self.counts[kind] += 1
        denied = self.authorize(request)
        if denied is not None:
            return denied
        org = self.org(request)
        if isinstance(org, Response):
            return org
        device = self.device(org, request)
        if isinstance(device, Response):
            return device
        if action == "download":
            return self._download(org, request)
        if action == "getFileInfo":
            if not self.switches.file_info:
                return failure(99400, "Invalid Argument action: unsupported action getFileInfo")
            blob = self._blob_for(org, request)
            if isinstance(blob, Response):
                return blob
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

    def _download(self, org: Org, request: Request) -> Any:
        blob = self._blob_for(org, request)
        if isinstance(blob, Response):
            return blob
        size = blob.size
        headers = {
            "content-type": "application/octet-stream",
            "accept-ranges": "bytes" if self.switches.honour_range else "none",
        }
        wanted = parse_range(request.headers.get("range"), size)
        if not self.switches.honour_range:
            wanted = None
        path = str(self.state.blob_path(blob))
        if wanted == "unsatisfiable":
            self.counts["files.download.416"] += 1
            return Response(status_code=416, headers={"content-range": f"bytes */{size}"})
        if wanted is None:
            self.counts["files.download.full"] += 1
            return BlobResponse(path, 0, size - 1, 200, headers, self.counts)
        first, last = wanted  # type: ignore[misc]
        self.counts["files.download.ranged"] += 1
        headers["content-range"] = f"bytes {first}-{last}/{size}"
        return BlobResponse(path, first, last, 206, headers, self.counts)

    # -- integration (upload) ------------------------------------------------------------

    async def integration(self, request: Request) -> Response:
        action = request.query_params.get("action", "")
        self.counts[f"integration.{action}"] += 1
        denied = self.authorize(request)
        if denied is not None:
            return denied
        org = self.org(request)
        if isinstance(org, Response):
            return org
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
            if hasattr(part, "filename") and part.filename:
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
        action = request.query_params.get("action", "")
        self.counts[f"devices.{action}"] += 1
        denied = self.authorize(request)
        if denied is not None:
            return denied
        org = self.org(request)
        if isinstance(org, Response):
            return org
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
        docs = [self.device_doc(org, d) for d in org.devices.values()]
        docs = [doc for doc in docs if pred(doc)]
        docs.sort(key=lambda doc: doc["createTime"], reverse=True)
        return self._page(docs, body, MAX_DEVICE_PAGE)

    def _page(self, docs: list[dict[str, Any]], body: dict[str, Any], max_size: int) -> Response:
        pagination = body.get("pagination") or {}
        try:
            page_no = int(pagination.get("pageNo", 1))
            page_size = int(pagination.get("pageSize", 10))
        except (TypeError, ValueError):
            return failure(99400, "Invalid Argument pagination")
        if page_no < 1 or page_size < 1 or page_size > max_size:
            return failure(99400, f"Invalid Argument pagination: pageSize must be 1..{max_size}")
        chosen = docs[(page_no - 1) * page_size : page_no * page_size]
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
        action = request.query_params.get("action", "")
        self.counts[f"thing-models.{action}"] += 1
        denied = self.authorize(request)
        if denied is not None:
            return denied
        org = self.org(request)
        if isinstance(org, Response):
            return org
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
        action = request.query_params.get("action", "")
        self.counts[f"measurepoints.{action}"] += 1
        denied = self.authorize(request)
        if denied is not None:
            return denied
        org = self.org(request)
        if isinstance(org, Response):
            return org
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
        action = request.query_params.get("action", "")
        self.counts[f"ota-firmwares.{action}"] += 1
        denied = self.authorize(request)
        if denied is not None:
            return denied
        org = self.org(request)
        if isinstance(org, Response):
            return org
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
