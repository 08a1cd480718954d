"""Which proxy a request goes through, read from the environment as httpx and curl
read it: HTTPS_PROXY for https targets, HTTP_PROXY for http ones, ALL_PROXY for
either, NO_PROXY for the hosts that go direct; lower case wins over upper case, an
empty value is no value, a value without a scheme is an http:// proxy.

NO_PROXY entries, comma separated: `*` (no proxy at all), a host name (itself and
its subdomains; a leading `.` or `*.` is the same), an IP address or a CIDR range, a
`[v6]` literal, each optionally with `:port` (then only that port) or a scheme
prefix `https://` (then only that scheme). Loopback is proxied like any other host
unless NO_PROXY names it: httpx does the same, and a proxy on the same machine that
forwards to a local service is a real set-up.

Credentials in the proxy URL (user:pass@) become a Proxy-Authorization header and
are kept out of every string this module makes: `Proxy.shown` is what logs and
errors may say.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import httpx

from enosfs.errors import ConfigError


class ProxyAuthRequired(httpx.ProxyError):
    """A proxy answered 407: it wants credentials the environment does not give, or
    refused those it does. The message names the proxy as `Proxy.shown` does, never
    the credentials; retry.py fails the call at once on it."""

    def __init__(self, proxy: Proxy) -> None:
        why = (
            "it refused the ones given"
            if proxy.authorization is not None
            else "none are given (http://USER:PASSWORD@host:port in the proxy variable)"
        )
        super().__init__(f"the proxy {proxy.shown} asks for credentials: {why}")


@dataclass(frozen=True)
class Proxy:
    """An http:// proxy: where to connect, and its credentials as a header value."""

    host: str
    port: int
    authorization: bytes | None = field(default=None, repr=False)

    @property
    def shown(self) -> str:
        """The proxy as logs and errors may name it: no credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __str__(self) -> str:
        return self.shown


def parse_proxy(value: str, var: str) -> Proxy:
    """A proxy URL from the environment; ConfigError (naming the variable, never the
    credentials) for one enosfs cannot use."""
    if "://" not in value:
        value = "http://" + value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{var} is not a proxy URL") from None
    if "@" in value.split("://", 1)[1] and "@" not in parts.netloc:
        # A '/', '?' or '#' in the credentials cut them short: what is left would be
        # taken for the host, and shown in the log.
        raise ConfigError(f"{var}: percent-encode the user name and password in it")
    if parts.scheme.lower() != "http":
        raise ConfigError(
            f"{var}: only http:// proxies are supported (CONNECT carries https), "
            f"not {parts.scheme}://"
        )
    if not parts.hostname:
        raise ConfigError(f"{var} names no proxy host")
    auth = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = b"Basic " + base64.b64encode(pair.encode())
    return Proxy(parts.hostname, port or 80, auth)


class _Bypass:
    """One NO_PROXY entry."""

    def __init__(self, entry: str) -> None:
        self.scheme: str | None = None
        if "://" in entry:
            self.scheme, entry = entry.split("://", 1)
        self.port: int | None = None
        host = entry
        if entry.startswith("["):  # [v6] or [v6]:port
            host, _, rest = entry[1:].partition("]")
            if rest.startswith(":") and rest[1:].isdigit():
                self.port = int(rest[1:])
        elif entry.count(":") == 1:  # host:port (more colons: a bare IPv6 address)
            name, _, port = entry.partition(":")
            if port.isdigit():
                host, self.port = name, int(port)
        self.network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
        with contextlib.suppress(ValueError):
            self.network = ipaddress.ip_network(host, strict=False)
        self.suffix = host.lstrip("*").lstrip(".")

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if self.scheme is not None and self.scheme != scheme:
            return False
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            try:
                return ipaddress.ip_address(host) in self.network
            except ValueError:
                return False
        return bool(self.suffix) and (host == self.suffix or host.endswith("." + self.suffix))


@dataclass
class Proxies:
    """The proxies of one environment; `for_origin` answers per request."""

    http: Proxy | None = None
    https: Proxy | None = None
    bypass: list[_Bypass] = field(default_factory=list)
    bypass_all: bool = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Proxies:
        def get(name: str) -> tuple[str, str] | None:
            for var in (name, name.upper()):
                value = environ.get(var, "").strip()
                if value:
                    return var, value
            return None

        every = get("all_proxy")
        found: dict[str, Proxy | None] = {}
        for scheme in ("http", "https"):
            chosen = get(f"{scheme}_proxy") or every
            found[scheme] = parse_proxy(chosen[1], chosen[0]) if chosen else None
        no = get("no_proxy")
        entries = [e.strip().lower() for e in (no[1] if no else "").split(",") if e.strip()]
        return cls(
            http=found["http"],
            https=found["https"],
            bypass=[_Bypass(e) for e in entries if e != "*"],
            bypass_all="*" in entries,
        )

    def __bool__(self) -> bool:
        return (self.http or self.https) is not None

    def for_origin(self, scheme: str, host: str, port: int) -> Proxy | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.bypass_all:
            return None
        host = host.lower().strip("[]").rstrip(".")
        if any(b.matches(scheme, host, port) for b in self.bypass):
            return None
        return proxy
