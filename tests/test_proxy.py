"""Proxies: which one the environment names for a request, and mounts that read
through a real proxy (tinyproxy, from the distribution) over TLS and plain HTTP, on the
same transport as direct requests."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from enosfs.emulator import process
from enosfs.errors import ConfigError, ProxyAuthError
from enosfs.proxies import Proxies, Proxy, parse_proxy
from enosfs.retry import RetryPolicy, retrying
from enosfs.transport import LeanTransport
from tests.support import (
    Emulator,
    demo_files,
    emulator,
    enosfs,
    is_mounted,
    mounted,
    secret_env,
    stats_of,
    write_config,
)
from tests.test_faults import make_cert

PROXY_PW = "hunter2-proxy-pw"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

# -- which proxy, from the environment --------------------------------------------------


def test_lower_case_wins_and_all_proxy_fills_in() -> None:
    p = Proxies.from_environ(
        {"HTTPS_PROXY": "http://upper:1", "https_proxy": "lower:3128", "ALL_PROXY": "all:8"}
    )
    assert p.https == Proxy("lower", 3128) and p.http == Proxy("all", 8)
    assert not Proxies.from_environ({"HTTPS_PROXY": " ", "NO_PROXY": "x"})


@pytest.mark.parametrize(
    ("no_proxy", "scheme", "host", "port", "direct"),
    [
        ("example.com", "https", "example.com", 443, True),
        ("example.com", "https", "api.example.com", 443, True),
        ("example.com", "https", "badexample.com", 443, False),
        (".example.com", "https", "example.com", 443, True),
        ("*.example.com", "https", "a.example.com", 443, True),
        ("*", "https", "anything", 443, True),
        ("example.com:8443", "https", "example.com", 443, False),
        ("example.com:8443", "https", "example.com", 8443, True),
        ("127.0.0.1", "http", "127.0.0.1", 80, True),
        ("10.0.0.0/8", "https", "10.1.2.3", 443, True),
        ("10.0.0.0/8", "https", "11.1.2.3", 443, False),
        ("::1", "https", "::1", 443, True),
        ("[::1]:8443", "https", "::1", 8443, True),
        ("http://example.com", "https", "example.com", 443, False),
        ("localhost", "https", "127.0.0.1", 443, False),  # loopback is proxied unless named
        (" other.org , Example.COM ", "https", "example.com.", 443, True),
    ],
)
def test_no_proxy(no_proxy: str, scheme: str, host: str, port: int, direct: bool) -> None:
    p = Proxies.from_environ({"ALL_PROXY": "http://proxy:3128", "no_proxy": no_proxy})
    assert (p.for_origin(scheme, host, port) is None) == direct


def test_credentials_become_a_header_and_are_never_shown() -> None:
    p = Proxies.from_environ({"HTTPS_PROXY": f"http://al%40ice:{PROXY_PW}@proxy:3128"})
    assert p.https is not None and p.https.authorization is not None
    assert p.https.authorization.startswith(b"Basic ")
    for text in (p.https.shown, str(p.https), repr(p.https), repr(p)):
        assert PROXY_PW not in text and "ice" not in text
    with pytest.raises(ConfigError) as info:
        Proxies.from_environ({"https_proxy": f"https://u:{PROXY_PW}@proxy:443"})
    assert "https_proxy" in str(info.value) and PROXY_PW not in str(info.value)
    # A '/' in a password not percent-encoded would cut it short, and what follows
    # would be taken for the host: refused, without showing any of it.
    with pytest.raises(ConfigError) as info:
        Proxies.from_environ({"HTTPS_PROXY": "http://bob:12/34@proxy:3128"})
    assert "percent-encode" in str(info.value) and "bob" not in str(info.value)


# -- a real proxy -----------------------------------------------------------------------


@dataclass
class Tinyproxy:
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        """The request lines it logged: `CONNECT host:port HTTP/1.1`, `GET http://...`."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [ln.split("): ", 1)[1] for ln in text.splitlines() if "Request (" in ln]


@contextmanager
def tinyproxy(tmp: Path, user: str | None = None) -> Iterator[Tinyproxy]:
    """tinyproxy on a free loopback port, with its config and log in tmp; with a user,
    it asks for `user:PROXY_PW`."""
    if shutil.which("tinyproxy") is None:
        pytest.fail("tinyproxy is missing: run scripts/test, which installs it", pytrace=False)
    auth = (user, PROXY_PW) if user else None
    with process.tinyproxy(tmp, basic_auth=auth, timeout=60) as (port, log):
        yield Tinyproxy(port, log)


@contextmanager
def proxy_env(**values: str) -> Iterator[dict[str, str]]:
    """Only these proxy variables, for the mounts started inside (children inherit
    os.environ); the outer ones are back afterwards."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.lower() in PROXY_VARS}
    os.environ.update(values)
    try:
        yield dict(os.environ)
    finally:
        for k in values:
            os.environ.pop(k, None)
        os.environ.update(saved)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_proxy_asking_for_credentials_is_asked_once(scheme: str, work: Path) -> None:
    """tinyproxy wants alice's password: without one, or with a wrong one, every
    attempt would get the same 407, so the call fails at the first, with one line
    that names the proxy and shows no credentials; its connection slot comes back.
    (tinyproxy answers a plain request with a wrong password by 401, which the server
    behind may send too: only its answer to a CONNECT is surely the proxy's.)"""
    policy = RetryPolicy(timeout=20, base_delay=0.01, max_delay=0.01, max_attempts=8)
    wrong = f"alice:wrong-{PROXY_PW}@"
    with tinyproxy(work, user="alice") as proxy:
        for given in ("", wrong) if scheme == "https" else ("",):
            chosen = parse_proxy(f"http://{given}127.0.0.1:{proxy.port}", "HTTPS_PROXY")
            lean = LeanTransport(proxies=Proxies(http=chosen, https=chosen))
            attempts = 0

            async def attempt(c: httpx.AsyncClient) -> httpx.Response:
                nonlocal attempts
                attempts += 1
                # Nothing listens on port 1: the proxy refuses before it would try.
                return await c.get(f"{scheme}://127.0.0.1:1/token")

            async with httpx.AsyncClient(transport=lean) as c:
                with pytest.raises(ProxyAuthError) as info:
                    await retrying(policy, "token request", partial(attempt, c))
            text = str(info.value)
            assert attempts == 1, text
            assert text.startswith(f"token request: the proxy {proxy.url} asks for credentials")
            assert "\n" not in text and PROXY_PW not in text and "alice" not in text
            assert info.value.errno == errno.EACCES
            assert ("refused the ones given" in text) == bool(given)
            assert lean.in_use == 0


@pytest.mark.mount
def test_https_through_a_real_proxy_tunnel_verifies_the_target(
    demo_emu: Emulator, work: Path
) -> None:
    """CONNECT through tinyproxy with credentials, TLS to the emulator inside the
    tunnel: bytes right, the target's certificate checked (not trusted: no mount), TLS
    bodies read into the cache's buffers, and the credentials in no log or stats."""
    cert, key = make_cert(work)
    with (
        emulator(demo_emu.data_dir, "demo", "--tls-cert", str(cert), "--tls-key", str(key)) as emu,
        tinyproxy(work, user="alice") as proxy,
    ):
        target = emu.url.removeprefix("https://")
        files = demo_files(emu)
        env = f"http://alice:{PROXY_PW}@127.0.0.1:{proxy.port}"
        (work / "untrusted").mkdir()
        with proxy_env(HTTPS_PROXY=env) as environ:
            out = enosfs(
                "mount",
                "-f",
                "--config",
                write_config(work / "c.toml", emu),
                work / "untrusted",
                env={**secret_env(emu.app_secret), **environ},
                timeout=60,
            )
        assert out.returncode == 1 and "certificate" in out.stderr.lower(), out.stderr
        assert PROXY_PW not in out.stderr and not is_mounted(work / "untrusted")
        assert f"CONNECT {target} HTTP/1.1" in proxy.requests()
        tunnels = len(proxy.requests())

        with (
            proxy_env(https_proxy=env, HTTP_PROXY="http://127.0.0.1:1"),
            mounted(work, emu, f'[network]\nca_bundle = "{cert}"\n') as m,
        ):
            for rel in ("WTG-003/feature/model_file.json", "INV-101/ota/inverter-dsp-2.3.1.hex"):
                assert (m.org / rel).read_bytes() == emu.blob(files[rel])
            stats = stats_of(m.path)
        assert len(proxy.requests()) > tunnels
        assert set(proxy.requests()) == {f"CONNECT {target} HTTP/1.1"}
        assert stats["transport"]["proxied_connections"] > 0
        # The file bodies were decrypted straight into buffers, not copied out of TLS.
        assert stats["transport"]["tls_recv_into"] > 0
        assert stats["transport"]["proxy"]["https"] == proxy.url
        for text in (m.log_text(), json.dumps(stats), m.stderr):
            assert PROXY_PW not in text
        assert proxy.url in m.log_text()


@pytest.mark.mount
def test_http_through_a_real_proxy_and_no_proxy_goes_direct(emu: Emulator, work: Path) -> None:
    files = demo_files(emu)
    rel = "WTG-002/feature/scada_export.csv"
    with tinyproxy(work) as proxy:
        # A proxy without a scheme is an http:// one, as for curl and httpx.
        with proxy_env(HTTP_PROXY=f"127.0.0.1:{proxy.port}"), mounted(work, emu) as m:
            assert (m.org / rel).read_bytes() == emu.blob(files[rel])
        sent = proxy.requests()
        assert any(r.startswith(f"GET {emu.url}/connect-service/v2.1/files?") for r in sent)
        assert any(r.startswith(f"POST {emu.url}/apim-token-service/") for r in sent)

        port = emu.url.rsplit(":", 1)[1]
        with (
            proxy_env(HTTP_PROXY=proxy.url, no_proxy=f"example.com,127.0.0.1:{port}"),
            mounted(work, emu) as m,
        ):
            assert (m.org / rel).read_bytes() == emu.blob(files[rel])
            assert stats_of(m.path)["transport"]["proxied_connections"] == 0
        assert proxy.requests() == sent


class _LengthLiar(BaseHTTPRequestHandler):
    """An http proxy that forwards requests, and answers every download with two
    different Content-Lengths: a response no one can frame safely."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._forward()

    def do_POST(self) -> None:
        self._forward()

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        skip = {"host", "connection", "proxy-connection", "content-length"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        with httpx.Client(trust_env=False, timeout=30) as c:
            r = c.request(self.command, self.path, headers=headers, content=body)
        self.send_response(r.status_code)
        drop = {"content-length", "transfer-encoding", "connection", "content-encoding", "date"}
        for k, v in r.headers.multi_items():
            if k.lower() not in drop:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        if "action=download" in self.path:
            self.send_header("Content-Length", str(len(r.content) + 7))
        self.end_headers()
        self.wfile.write(r.content)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.mount
def test_conflicting_content_lengths_are_refused(emu: Emulator, work: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LengthLiar)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        config = '[network]\nretries = 0\ntimeout = "5s"\n'
        with proxy_env(HTTP_PROXY=url), mounted(work, emu, config) as m:
            assert "scada_export.csv" in os.listdir(m.org / "WTG-001" / "feature")
            with pytest.raises(OSError) as info:
                (m.org / "WTG-001/feature/scada_export.csv").read_bytes()
            assert info.value.errno == errno.EIO
            assert "conflicting Content-Length" in m.log_text()
            # The mount stays up and still answers what it can.
            assert os.listdir(m.org / "WTG-002" / "feature")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
