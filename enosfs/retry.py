"""Deadlines and retries for network calls.

One policy for every call: a call has a deadline that covers all its attempts, and only
failures that another attempt can cure (connect errors, resets, 5xx, 429) are retried,
with jittered exponential backoff so that many mounts do not retry in lockstep.

A server that breaks HTTP itself (a response that cannot be framed safely: two
Content-Lengths, one with chunked) and a proxy that asks for credentials (407) fail at
once with their own one-line error: another attempt would be answered the same way,
and eight of them only hide the cause behind a long wait.

A rate-limited answer (429) is not a failure but the gateway asking us to wait: it is
waited for (Retry-After, within the deadline) without spending the retries, so that a
listing held up by a 429 storm gets its answer late rather than EIO. Only where
retrying is off altogether (max_attempts 1) does a 429 end the call.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import httpx
import trio

from enosfs.connection import ProtocolViolation
from enosfs.errors import (
    DeadlineError,
    EnosfsError,
    ProtocolError,
    ProxyAuthError,
    RateLimited,
    ServerError,
    TransportError,
)
from enosfs.proxies import ProxyAuthRequired

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    timeout: float = 30.0
    base_delay: float = 0.05
    max_delay: float = 2.0
    max_attempts: int = 8


def _tls_failure(exc: BaseException) -> bool:
    """Somewhere in its chain of causes, a TLS error (a certificate that does not verify,
    a server that speaks no TLS): the next attempt would fail the same way."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, ssl.SSLError):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, RateLimited | ServerError):
        return True
    if isinstance(exc, httpx.TransportError):
        # A request we built wrong, or a TLS peer we must not trust, will not get
        # better by sending it again.
        if isinstance(
            exc,
            httpx.UnsupportedProtocol
            | httpx.LocalProtocolError
            | ProtocolViolation
            | ProxyAuthRequired,
        ):
            return False
        return not _tls_failure(exc)
    return isinstance(exc, TransportError) and not isinstance(exc, ProtocolError | ProxyAuthError)


def as_enosfs_error(exc: BaseException, what: str) -> EnosfsError:
    """Turn an httpx failure into our one-line error; ours pass through."""
    if isinstance(exc, EnosfsError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineError(f"{what}: timed out ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError):
        return TransportError(f"{what}: cannot connect: {exc or type(exc).__name__}")
    if isinstance(exc, ProxyAuthRequired):
        return ProxyAuthError(f"{what}: {exc}")
    if isinstance(exc, ProtocolViolation):
        return ProtocolError(f"{what}: the server broke HTTP: {exc}")
    return TransportError(f"{what}: {type(exc).__name__}: {exc}")


async def retrying(
    policy: RetryPolicy,
    what: str,
    attempt: Callable[[], Awaitable[T]],
    *,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run attempt() until it succeeds, fails for good, or the deadline passes."""
    deadline = trio.current_time() + policy.timeout
    last: BaseException | None = None
    failures = 0
    n = 0
    while True:
        try:
            with trio.fail_at(deadline):
                return await attempt()
        except trio.TooSlowError:
            detail = f" (last error: {as_enosfs_error(last, what)})" if last else ""
            raise DeadlineError(f"{what}: no answer within {policy.timeout:g}s{detail}") from None
        except (httpx.HTTPError, EnosfsError) as exc:
            if not (isinstance(exc, RateLimited) and policy.max_attempts > 1):
                failures += 1
            if not is_transient(exc) or failures >= policy.max_attempts:
                raise as_enosfs_error(exc, what) from None
            last = exc
            backoff = policy.base_delay * 2 ** min(n, 30)
            n += 1
            delay = random.uniform(0, min(policy.max_delay, backoff))
            if isinstance(exc, RateLimited) and exc.retry_after is not None:
                delay = max(delay, exc.retry_after)
            if trio.current_time() + delay >= deadline:
                raise as_enosfs_error(exc, what) from None
            log.debug("%s: retrying in %.2fs after %s", what, delay, as_enosfs_error(exc, what))
            if on_retry is not None:
                on_retry(exc)
            await trio.sleep(delay)
