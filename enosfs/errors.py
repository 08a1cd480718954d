"""Exceptions that cross module boundaries, and the errno each one means to a reader.

Every exception here renders as one line fit to show a user: no secrets, no tracebacks.
"""

from __future__ import annotations

import errno


class EnosfsError(Exception):
    """Base of every error enosfs reports; str() is the one-line message."""


class ConfigError(EnosfsError):
    """The configuration or the command line is wrong; nothing was mounted."""


class AuthError(EnosfsError):
    """The gateway refused our credentials (wrong appKey or secret)."""

    errno = errno.EACCES


class TransportError(EnosfsError):
    """The server could not be reached or stopped answering within the deadline."""

    errno = errno.EIO


class DeadlineError(TransportError):
    """A network call ran out of time."""

    errno = errno.ETIMEDOUT


class ProxyAuthError(TransportError):
    """The HTTP proxy asks for credentials (HTTP 407) that we lack, or refused ours:
    another attempt would be refused the same way, so none is made."""

    errno = errno.EACCES


class ProtocolError(TransportError):
    """The server answered something that is not what EnOS sends (bad JSON, short body...)."""


class IntegrityError(ProtocolError):
    """The bytes do not match the md5 or sign EnOS gave for the file."""


class FileChanged(ProtocolError):
    """The server's bytes are no longer the version a reader opened: reading on could
    mix two versions, so the reader gets ESTALE and a fresh open sees the new one."""

    errno = errno.ESTALE


class ApiError(EnosfsError):
    """An EnOS failure envelope: the code, message and requestId the server sent."""

    errno = errno.EIO

    def __init__(
        self,
        code: int | str | None,
        msg: str,
        request_id: str | None = None,
        *,
        http_status: int | None = None,
        what: str = "",
    ) -> None:
        self.code = code
        self.msg = msg
        self.request_id = request_id
        self.http_status = http_status
        self.what = what
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.what}: " if self.what else ""
        text += f"EnOS error {self.code}: {self.msg}"
        extra = []
        if self.http_status not in (None, 200):
            extra.append(f"HTTP {self.http_status}")
        if self.request_id:
            extra.append(f"requestId {self.request_id}")
        return f"{text} ({', '.join(extra)})" if extra else text


class NotFound(ApiError):
    errno = errno.ENOENT


class Denied(ApiError):
    errno = errno.EACCES


class UrlRefused(Denied):
    """The object store refused a pre-signed URL (HTTP 401/403: expired, revoked, or
    signed for something else): a new URL may be let in where this one was not."""


class InvalidArgument(ApiError):
    """99400: the server found our request wrong; to a reader, an I/O error."""


class TokenRejected(ApiError):
    """The gateway did not accept the access token we sent; a refresh may fix it."""

    errno = errno.EACCES


class RateLimited(ApiError):
    """HTTP 429 or a rate-limit envelope: temporary, to be retried after the server's
    Retry-After, and a sign to send fewer calls at once (throttle.py)."""

    def __init__(
        self,
        msg: str,
        retry_after: float | None,
        request_id: str | None = None,
        *,
        http_status: int | None = None,
        what: str = "",
        code: int | str = 429,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(code, msg, request_id, http_status=http_status, what=what)


class ServerError(ApiError):
    """HTTP 5xx or EnOS 99500: temporary on the server's side, worth a retry."""


NOT_FOUND_CODES = {99404, 24404}
DENIED_CODES = {99403}
INVALID_CODES = {99400}
SERVER_CODES = {99500}
TOKEN_CODES = {1203, 4011, 4012}
# Not in EnOS's documentation: what the emulator's gateway sends with its 429, and so
# what a gateway sending the envelope with HTTP 200 would say.
RATE_LIMIT_CODES = {99429}


def error_for_code(
    code: int | str | None, msg: str, request_id: str | None, *, http_status: int | None, what: str
) -> ApiError:
    """Pick the ApiError subclass whose errno fits an EnOS code."""
    try:
        icode = None if code is None else int(code)
    except (TypeError, ValueError):
        icode = None
    cls: type[ApiError] = ApiError
    if icode in NOT_FOUND_CODES:
        cls = NotFound
    elif icode in DENIED_CODES:
        cls = Denied
    elif icode in INVALID_CODES:
        cls = InvalidArgument
    elif icode in SERVER_CODES:
        cls = ServerError
    elif icode in TOKEN_CODES:
        cls = TokenRejected
    elif icode in RATE_LIMIT_CODES:
        return RateLimited(
            msg, None, request_id, http_status=http_status, what=what, code=code or 429
        )
    return cls(code, msg, request_id, http_status=http_status, what=what)


def errno_of(exc: BaseException) -> int:
    """The errno a FUSE call should fail with for this exception."""
    return int(getattr(exc, "errno", None) or errno.EIO)
