"""The access token: one trio task owns it, every request borrows it.

Requests never ask the token service themselves. They call `get()`, which returns the
current token or waits for the owner task to fetch one; when the gateway rejects a
token they call `rejected()`, and however many do so, the owner refreshes once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from enosfs.config import Secret, read_secret_file
from enosfs.errors import (
    ApiError,
    AuthError,
    ConfigError,
    EnosfsError,
    ProtocolError,
    ServerError,
)
from enosfs.jsonbody import read_capped
from enosfs.retry import RetryPolicy, retrying
from enosfs.signature import token_signature

log = logging.getLogger(__name__)

TOKEN_PATH = "/apim-token-service/v2.0/token/get"
REFRESH_PATH = "/apim-token-service/v2.0/token/refresh"

# Token-service status codes (enos-api.md).
_BAD_CREDENTIALS = {1002: "appKey does not exist", 1003: "encryption (signature) invalid"}
_REPLAYED = 1001
_TOKEN_GONE = {1203, 1204}
_SERVER = {1005}
_RETRY_AFTER_AUTH_FAILURE = 60.0
# While the credentials are refused, the secret file is looked at this often, so that
# a rotated secret written there is used within about this long.
_SECRET_FILE_POLL = 1.0
# A token must live at least a second and at most a year: anything else is a token
# service gone wrong, and a mount built on it would fail later and for the wrong reason.
_MAX_LIFETIME = 366 * 86400.0


@dataclass(frozen=True)
class Token:
    value: str
    lifetime: float
    expires_at: float  # trio clock

    def valid_at(self, now: float, skew: float) -> bool:
        return now < self.expires_at - skew


class TokenSource:
    """Holds the access token for one app and refreshes it ahead of expiry."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        gateway: str,
        app_key: str,
        app_secret: Secret,
        *,
        refresh_margin: float = 600.0,
        policy: RetryPolicy | None = None,
        secret_file: str | None = None,
    ) -> None:
        self._http = http
        self._gateway = gateway.rstrip("/")
        self._app_key = app_key
        self._secret = app_secret
        self._secret_file = secret_file
        self._margin = refresh_margin
        self._policy = policy or RetryPolicy()
        self._token: Token | None = None
        self._error: Exception | None = None
        self._rejected: str | None = None
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._last_ts = 0
        self._renewing = False
        self.refreshes = 0

    # -- what requests use -------------------------------------------------------------

    async def get(self) -> str:
        """A token the gateway should accept; waits while the owner task renews it."""
        while True:
            tok = self._token
            if (
                tok is not None
                and tok.value != self._rejected
                and tok.valid_at(trio.current_time(), self._skew(tok))
            ):
                return tok.value
            if self._error is not None:
                raise self._error
            changed = self._changed
            if not self._renewing:
                self._wake.set()
            await changed.wait()

    def rejected(self, token: str) -> None:
        """A request was told `token` is not accepted: renew it once, for everyone."""
        if self._token is not None and token == self._token.value and self._rejected != token:
            log.info("access token rejected by the gateway; renewing it")
            self._rejected = token
            if not self._renewing:
                self._wake.set()

    @property
    def expires_in(self) -> float | None:
        if self._token is None:
            return None
        return self._token.expires_at - trio.current_time()

    def stats(self) -> dict[str, Any]:
        """Its part of /.enosfs/stats: when the token runs out (in wall-clock time too,
        for a reader comparing with the gateway's clock), and how often it was renewed."""
        left = self.expires_in
        return {
            "token": {
                "expires_in_s": None if left is None else round(left, 1),
                "expires_at": None if left is None else round(time.time() + left, 1),
                "renewals": self.refreshes,
            }
        }

    # -- the owner task ----------------------------------------------------------------

    async def start(self) -> None:
        """Get the first token; raises AuthError or TransportError so the CLI can say why."""
        self._set(await self._fetch(refresh=False))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the token fresh until cancelled."""
        if self._token is None:
            await self.start()
        task_status.started()
        failures = 0
        while True:
            tok = self._token
            assert tok is not None
            if not self._needs_renewal(tok):
                refresh_at = tok.expires_at - min(self._margin, tok.lifetime * 0.25)
                with trio.move_on_at(refresh_at):
                    await self._wake.wait()
            self._wake = trio.Event()
            self._renewing = True
            try:
                self._set(await self._renew())
                failures = 0
            except AuthError as exc:
                if self._error is None:
                    log.error("%s", exc)
                self._error = exc
                self._wake_waiters()
                await self._await_new_secret(_RETRY_AFTER_AUTH_FAILURE)
            except EnosfsError as exc:
                # The token service is down or busy: try again soon, and again, while
                # requests wait (each within its own deadline).
                failures += 1
                log.warning("token renewal failed, will try again: %s", exc)
                self._wake_waiters()
                await trio.sleep(min(10.0, 0.5 * 2 ** min(failures, 5)))
            finally:
                self._renewing = False

    def _needs_renewal(self, tok: Token) -> bool:
        """Renew at once (not at the planned time): the token was rejected or is no
        longer valid, so requests are waiting."""
        return self._rejected == tok.value or not tok.valid_at(trio.current_time(), self._skew(tok))

    async def _await_new_secret(self, limit: float) -> None:
        """Wait up to `limit` seconds, less if the secret file gets a new secret.

        A rotated secret is written to the file by whoever rotated it; reading it again
        here lets the mount recover without a remount.
        """
        deadline = trio.current_time() + limit
        if self._secret_file is None:
            await trio.sleep_until(deadline)
            return
        complaint = ""
        while trio.current_time() < deadline:
            try:
                text = await trio.to_thread.run_sync(read_secret_file, self._secret_file)
            except ConfigError as exc:
                if str(exc) != complaint:  # once, not every poll
                    complaint = str(exc)
                    log.warning("%s", exc)
            else:
                if text != self._secret.reveal():
                    log.info("the app secret file has a new secret; asking for a token again")
                    self._secret = Secret(text)
                    return
            await trio.sleep(min(_SECRET_FILE_POLL, max(0.0, deadline - trio.current_time())))

    # -- internals ---------------------------------------------------------------------

    def _skew(self, tok: Token) -> float:
        return min(5.0, tok.lifetime * 0.1)

    def _set(self, tok: Token) -> None:
        if self._error is not None:
            log.info("access token obtained again")
        self._token = tok
        self._error = None
        self._rejected = None
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _renew(self) -> Token:
        """Refresh the current token; fall back to a new one when the old is gone."""
        self.refreshes += 1
        if self._token is not None:
            try:
                return await self._fetch(refresh=True)
            except _Gone:
                pass
        return await self._fetch(refresh=False)

    def _timestamp(self) -> int:
        # Strictly increasing, so the gateway never sees a replayed signature (1001).
        ts = max(int(time.time() * 1000), self._last_ts + 1)
        self._last_ts = ts
        return ts

    async def _fetch(self, *, refresh: bool) -> Token:
        what = "token refresh" if refresh else "token request"

        async def attempt() -> Token:
            ts = self._timestamp()
            body: dict[str, object] = {
                "appKey": self._app_key,
                "encryption": token_signature(self._app_key, ts, self._secret.reveal()),
                "timestamp": ts,
            }
            if refresh and self._token is not None:
                body["accessToken"] = self._token.value
            sent_at = trio.current_time()
            url = self._gateway + (REFRESH_PATH if refresh else TOKEN_PATH)
            async with self._http.stream("POST", url, json=body) as resp:
                raw = await read_capped(resp, what)
            return self._parse(resp, raw, sent_at, what, refresh=refresh)

        return await retrying(self._policy, what, attempt)

    def _parse(
        self, resp: httpx.Response, raw: bytes, sent_at: float, what: str, *, refresh: bool
    ) -> Token:
        if resp.status_code >= 500 or resp.status_code == 429:
            raise ServerError(
                resp.status_code,
                f"HTTP {resp.status_code}",
                http_status=resp.status_code,
                what=what,
            )
        try:
            doc = json.loads(raw)
        except ValueError:
            raise ProtocolError(f"{what}: HTTP {resp.status_code}, body is not JSON") from None
        if not isinstance(doc, dict):
            raise ProtocolError(f"{what}: unexpected answer")
        given: Any = doc.get("status", doc.get("stauts"))  # any JSON value, or absent
        msg = str(doc.get("msg") or doc.get("message") or "")
        try:
            status = int(given)
        except (TypeError, ValueError):
            raise ProtocolError(f"{what}: HTTP {resp.status_code}, no status: {msg}") from None
        if status == 0:
            data = doc.get("data") or {}
            value = data.get("accessToken") if isinstance(data, dict) else None
            expire = data.get("expire") if isinstance(data, dict) else None
            if (
                not isinstance(value, str)
                or not value
                # It goes into a header of every request: visible ASCII only, so no
                # error about a bad header ever has a reason to show it.
                or not all(33 <= ord(c) < 127 for c in value)
                or isinstance(expire, bool)
                or not isinstance(expire, int | float)
            ):
                raise ProtocolError(f"{what}: answer lacks accessToken or expire")
            if not 1.0 <= expire <= _MAX_LIFETIME:  # NaN fails this too
                raise ProtocolError(
                    f"the token service answered expire={expire!r} (seconds a token is "
                    "valid); a usable token lives from 1 second to a year"
                )
            lifetime = float(expire)
            return Token(value, lifetime, sent_at + lifetime)
        if status in _BAD_CREDENTIALS:
            raise AuthError(
                f"the gateway refused app key {self._app_key!r}: "
                f"{_BAD_CREDENTIALS[status]} (status {status}); check app_key and the app secret"
            )
        if status in _TOKEN_GONE and refresh:
            raise _Gone(status, msg, what=what)
        if status == _REPLAYED or status in _SERVER:
            raise ServerError(status, msg or "token service busy", what=what)
        raise AuthError(f"{what} failed: status {status}: {msg}")


class _Gone(ApiError):
    """The token to refresh has expired or cannot be refreshed: ask for a new one."""
