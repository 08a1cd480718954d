"""scripts/bench: enosfs against a plain HTTP client on the same server.

Each workload runs on a fresh mount (so the kernel's page cache and enosfs's own cache
are cold) unless it is marked warm, and the same workload done by a plain HTTP client
against the same server gives the limit. Every byte read is checked against the
reference. Prints a table of values and ratios and writes JSON. Measures; asserts
nothing.

`--network rtt=40ms,conn=25MB/s,link=125MB/s` plays every workload across a distant
link (the emulator's network profile, set once its file cache is warm), `--tls` serves
it over HTTPS with a self-signed certificate the mount and the plain client trust.
`--profile wan` runs the table of issue 11 (first byte, random reads on a fast and a
thin link, listings, copies, TLS on loopback, a real proxy) under such a profile, the
link's capacity stated next to each row as the bound no client can pass.

`--profile scale` measures browsing a big organisation far away instead (a generated
seed, 40 ms a request, a rate limit): scripts/bench_scale.py.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import shutil
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from enosfs.emulator import process
from enosfs.emulator.network import NetworkError, NetworkProfile
from enosfs.emulator.process import (
    MountFailed,
    mount_in_background,
    plain_token,
    start_emulator,
    stop_process,
    unmount_and_wait,
    wait_mounted,
)
from enosfs.emulator.state import generated_bytes
from enosfs.errors import EnosfsError

MiB = 1024 * 1024
ORG, APP_KEY, APP_SECRET = "o-bench", "bench-app", "bench-secret"
ASSET, SMALL_ASSET = "BENCH-1", "BENCH-SMALL"
BIG_SIZE, MID_SIZE, SMALL_SIZE, SMALL_COUNT = 512 * MiB, 64 * MiB, 64 * 1024, 500
MEMORY_BUDGET = 512 * MiB
REPEAT = 3
EXTRA_CONFIG = ""  # --config-extra: more TOML for every mount
TIMEOUT = 600
BIG, MID = f"{ASSET}/feature/big.bin", f"{ASSET}/feature/mid.bin"
WAN = "rtt=40ms,conn=25MB/s,link=125MB/s"  # issue 11's far gateway
THIN = "conn=2MB/s,link=4MB/s"  # a site office's link; round trips as WAN's
WAN_ROWS = ("seq", "ttfb", "random", "thin", "ls", "cp", "tls", "proxy")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def bench_seed() -> dict[str, Any]:
    small = {f"f{i:03d}": "FILE" for i in range(SMALL_COUNT)}
    return {
        "apps": [{"appKey": APP_KEY, "appSecret": APP_SECRET}],
        "orgs": [
            {
                "orgId": ORG,
                "models": [
                    {"modelId": "big", "attributes": {"big": "FILE", "mid": "FILE"}},
                    {"modelId": "small", "attributes": small},
                ],
                "products": [
                    {"productKey": "pBig", "modelId": "big"},
                    {"productKey": "pSmall", "modelId": "small"},
                ],
                "devices": [
                    {
                        "assetId": ASSET,
                        "productKey": "pBig",
                        "attributes": {
                            "big": {"bytes": BIG_SIZE, "seed": "big", "name": "big.bin"},
                            "mid": {"bytes": MID_SIZE, "seed": "mid", "name": "mid.bin"},
                        },
                    },
                    {
                        "assetId": SMALL_ASSET,
                        "productKey": "pSmall",
                        "attributes": {
                            k: {"bytes": SMALL_SIZE, "seed": k, "name": f"{k}.bin"} for k in small
                        },
                    },
                ],
            }
        ],
    }


# -- the server and a plain client ------------------------------------------------------


@dataclass
class Server:
    url: str
    token: str = ""
    uris: dict[str, str] = field(default_factory=dict)  # path under org -> fileUri
    cafile: str | None = None  # the self-signed certificate of an HTTPS emulator

    @property
    def verify(self) -> str | bool:
        return self.cafile or True

    def get_token(self) -> None:
        with httpx.Client(verify=self.verify) as c:
            self.token = plain_token(c, self.url, APP_KEY, APP_SECRET)

    def discover(self) -> None:
        for asset in (ASSET, SMALL_ASSET):
            r = httpx.get(
                f"{self.url}{listing_query(asset)}",
                headers={"apim-accesstoken": self.token},
                timeout=30,
                verify=self.verify,
            )
            for ident, uri in r.json()["data"]["deviceAttributes"].items():
                self.uris[f"{asset}/feature/{ident}.bin"] = uri

    def set_network(self, spec: str) -> None:
        """Play another link from now on (the emulator's admin API; "" for loopback)."""
        r = httpx.post(
            f"{self.url}/__emulator__/network",
            json={"network": spec},
            timeout=30,
            verify=self.verify,
        )
        if r.status_code != 200:
            raise SystemExit(f"bench: the server took no network profile: {r.text}")

    def path_query(self, rel: str) -> str:
        asset = rel.split("/")[0]
        q = {
            "action": "download",
            "orgId": ORG,
            "assetId": asset,
            "category": "feature",
            "fileUri": self.uris[rel],
        }
        return f"/connect-service/v2.1/files?{urlencode(q)}"


def listing_query(asset: str) -> str:
    """One device's attributes, fileUris included: a folder's listing, without sizes."""
    q = {"action": "get", "orgId": ORG, "assetId": asset}
    return f"/connect-service/v2.1/devices?{urlencode(q)}"


class PlainClient:
    """The limit: http.client on one keep-alive connection, no cache, no FUSE."""

    def __init__(self, server: Server) -> None:
        parts = urlsplit(server.url)
        self.server = server
        host = parts.hostname or "127.0.0.1"
        self.conn: http.client.HTTPConnection
        if parts.scheme == "https":
            tls = ssl.create_default_context(cafile=server.cafile)
            self.conn = http.client.HTTPSConnection(host, parts.port, timeout=60, context=tls)
        else:
            self.conn = http.client.HTTPConnection(host, parts.port, timeout=60)

    def get(self, rel: str, start: int | None = None, size: int | None = None) -> bytes:
        headers = {"apim-accesstoken": self.server.token}
        if start is not None and size is not None:
            headers["Range"] = f"bytes={start}-{start + size - 1}"
        return self.request(self.server.path_query(rel), headers)

    def request(self, path_query: str, headers: dict[str, str] | None = None) -> bytes:
        headers = headers or {"apim-accesstoken": self.server.token}
        self.conn.request("GET", path_query, headers=headers)
        resp = self.conn.getresponse()
        return resp.read()

    def drain(self, rel: str) -> str:
        """A whole file, hashed as it arrives rather than held: 512 MiB needs no copy."""
        self.conn.request(
            "GET", self.server.path_query(rel), headers={"apim-accesstoken": self.server.token}
        )
        resp = self.conn.getresponse()
        h, buf = hashlib.md5(), bytearray(MiB)
        while n := resp.readinto(buf):
            h.update(memoryview(buf)[:n])
        return h.hexdigest()

    def close(self) -> None:
        self.conn.close()


def curl(server: Server, rel: str) -> subprocess.Popen[bytes]:
    url = server.url + server.path_query(rel)
    trust = ["--cacert", server.cafile] if server.cafile else []
    return subprocess.Popen(
        ["curl", "-sf", *trust, "-o", "/dev/null", "-H", f"apim-accesstoken: {server.token}", url]
    )


# -- mounts -----------------------------------------------------------------------------


@dataclass
class Mounted:
    proc: subprocess.Popen[bytes]
    path: Path

    @property
    def org(self) -> Path:
        return self.path / ORG

    def peak_rss(self) -> int:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


@contextlib.contextmanager
def environment(changes: dict[str, str | None]) -> Iterator[None]:
    """os.environ with these set (None: removed), for a child started inside, which
    copies it; the bench's own clients see the old one again afterwards."""
    saved = {k: os.environ.get(k) for k in changes}
    try:
        for k, v in changes.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


@contextlib.contextmanager
def mount(
    server: Server, work: Path, extra: str = "", env: dict[str, str | None] | None = None
) -> Iterator[Mounted]:
    """A fresh mount of the server; env: changes to the environment it starts with."""
    extra = EXTRA_CONFIG + "\n" + extra
    if server.cafile:
        # A table of its own: TOML allows keys after it only within it.
        extra = f'[network]\nca_bundle = "{server.cafile}"\n' + extra
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    cfg = work / "bench.toml"
    cfg.write_text(
        f'[enos]\ngateway = "{server.url}"\napp_key = "{APP_KEY}"\n'
        f'[[org]]\nid = "{ORG}"\n[cache]\nmemory = "{MEMORY_BUDGET}"\n{extra}\n'
    )
    with environment(env or {}):
        proc = mount_in_background(cfg, mnt, APP_SECRET, "--log-level", "warning", stdout=None)
    try:
        try:
            wait_mounted(mnt, proc)
        except MountFailed:
            raise SystemExit("bench: the mount did not start") from None
        yield Mounted(proc, mnt)
    finally:
        unmount_and_wait(mnt, proc)


# -- workloads --------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    unit: str
    enosfs: float
    limit: float | None
    target: str
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    verified: bool = True
    bound: float | None = None  # what the link allows any client, in the same unit
    bound_note: str = ""  # what that bound is made of

    @property
    def ratio(self) -> float | None:
        if self.limit in (None, 0):
            return None
        assert self.limit is not None
        return self.enosfs / self.limit if self.higher_is_better else self.limit / self.enosfs


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def dd(path: Path, bs: str = "1M") -> float:
    t, _ = timed(
        lambda: subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", f"bs={bs}"],
            capture_output=True,
            timeout=TIMEOUT,
            check=True,
        )
    )
    return t


def md5_of(path: Path) -> str:
    out = subprocess.run(
        ["md5sum", str(path)], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    return out.stdout.split()[0]


class Bench:
    def __init__(self, server: Server, work: Path, refs: dict[str, bytes]) -> None:
        self.server = server
        self.work = work
        self.refs = refs
        self.results: list[Result] = []
        self.peak_rss = 0

    def note(self, m: Mounted) -> None:
        self.peak_rss = max(self.peak_rss, m.peak_rss())

    def sequential(self) -> None:
        """Cold sequential reads, each on a fresh mount; the median of REPEAT runs on
        both sides, since this 2-core machine's numbers vary from run to run."""
        rel = f"{ASSET}/feature/big.bin"
        want = hashlib.md5(self.refs[rel]).hexdigest()
        size = BIG_SIZE / 1e6
        limit = statistics.median(timed(curl(self.server, rel).wait)[0] for _ in range(REPEAT))
        for label, extra in (("", ""), (" (direct_io)", "[kernel]\ndirect_io = true\n")):
            cold, warm, ok = [], [], True
            for _ in range(REPEAT):
                with mount(self.server, self.work, extra) as m:
                    cold.append(dd(m.org / rel))
                    warm.append(dd(m.org / rel))
                    ok = ok and md5_of(m.org / rel) == want
                    self.note(m)
            self.results.append(
                Result(
                    f"a. sequential 512 MiB, cold{label}",
                    "MB/s",
                    size / statistics.median(cold),
                    size / limit,
                    ">= 0.35x",
                    verified=ok,
                )
            )
            self.results.append(
                Result(
                    f"b. sequential re-read, warm{label}",
                    "MB/s",
                    size / statistics.median(warm),
                    size / limit,
                    ">= 0.7x",
                    verified=ok,
                )
            )

    def random_reads(self, count: int, size: int, label: str, target: str) -> None:
        rel = f"{ASSET}/feature/big.bin"
        ref = self.refs[rel]
        rnd = random.Random(size)
        offsets = [rnd.randrange(0, BIG_SIZE - size) for _ in range(count)]
        lat: list[float] = []
        got: list[bytes] = []
        with mount(self.server, self.work) as m:
            fd = os.open(m.org / rel, os.O_RDONLY)
            try:
                os.pread(fd, 1, 0)  # open and first block out of the way
                t0 = time.perf_counter()
                for off in offsets:
                    s = time.perf_counter()
                    got.append(os.pread(fd, size, off))
                    lat.append(time.perf_counter() - s)
                total = time.perf_counter() - t0
            finally:
                os.close(fd)
            self.note(m)
        ok = all(g == ref[o : o + size] for g, o in zip(got, offsets, strict=True))
        plain = PlainClient(self.server)
        try:
            t0 = time.perf_counter()
            for off in offsets:
                plain.get(rel, off, size)
            limit = time.perf_counter() - t0
        finally:
            plain.close()
        lat.sort()
        extra = {"p50_ms": statistics.median(lat) * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3}
        if size <= 4096:
            self.results.append(
                Result(
                    label, "reads/s", count / total, count / limit, target, extra=extra, verified=ok
                )
            )
        else:
            mb = count * size / 1e6
            self.results.append(
                Result(label, "MB/s", mb / total, mb / limit, target, extra=extra, verified=ok)
            )

    def parallel(self) -> None:
        rel = f"{ASSET}/feature/mid.bin"
        want = hashlib.md5(self.refs[rel]).hexdigest()
        with mount(self.server, self.work) as m:

            def go() -> list[str]:
                procs = [
                    subprocess.Popen(
                        ["md5sum", str(m.org / rel)], stdout=subprocess.PIPE, text=True
                    )
                    for _ in range(4)
                ]
                return [p.communicate(timeout=TIMEOUT)[0].split()[0] for p in procs]

            t, sums = timed(go)
            self.note(m)
        ok = sums == [want] * 4
        t_limit, _ = timed(lambda: [p.wait() for p in [curl(self.server, rel) for _ in range(4)]])
        mb = 4 * MID_SIZE / 1e6
        self.results.append(
            Result(
                "e. 4 readers of one 64 MiB file",
                "MB/s",
                mb / t,
                mb / t_limit,
                ">= 0.4x",
                verified=ok,
            )
        )

    def small_files(self) -> None:
        folder = f"{SMALL_ASSET}/feature"
        rels = sorted(r for r in self.server.uris if r.startswith(folder))
        dest = self.work / "copy"

        def ls() -> None:
            subprocess.run(["ls", "-l", str(m.org / folder)], capture_output=True, check=True)

        def cp() -> None:
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run(
                ["cp", "-r", str(m.org / folder), str(dest)], check=True, timeout=TIMEOUT
            )

        with mount(self.server, self.work) as m:
            t_ls_cold, _ = timed(ls)
            before = stats(self.server)
            t_ls = statistics.median(timed(ls)[0] for _ in range(REPEAT))
            after = stats(self.server)
            downloads = after.get("files.download", 0) - before.get("files.download", 0)
            self.note(m)
        copies: list[float] = []
        ok = True
        for _ in range(REPEAT):
            with mount(self.server, self.work) as m:
                ls()  # metadata warm: what is measured is the copy itself
                copies.append(timed(cp)[0])
                self.note(m)
            ok = ok and all((dest / Path(r).name).read_bytes() == self.refs[r] for r in rels)
        with mount(self.server, self.work) as m:
            t_cp_cold, _ = timed(cp)
            self.note(m)
        shutil.rmtree(dest, ignore_errors=True)
        plain = PlainClient(self.server)
        try:
            t_limit = statistics.median(
                timed(lambda: [plain.get(r) for r in rels])[0] for _ in range(REPEAT)
            )
        finally:
            plain.close()
        self.results.append(
            Result(
                "f. ls -l 500 files, warm metadata",
                "s",
                t_ls,
                None,
                "<= 0.05 s, 0 downloads",
                higher_is_better=False,
                extra={"downloads": float(downloads), "cold_s": t_ls_cold},
                verified=downloads == 0,
            )
        )
        self.results.append(
            Result(
                "f. cp -r 500 files of 64 KiB",
                "s",
                statistics.median(copies),
                t_limit,
                "<= 2x limit",
                higher_is_better=False,
                extra={"cold_metadata_s": t_cp_cold},
                verified=ok,
            )
        )

    def first_byte(self) -> None:
        """Open and first 4 KiB of a file whose folder was listed (the data path), on a
        fresh mount; the cold figure also includes finding the file."""
        rel = f"{ASSET}/feature/mid.bin"

        def first() -> bytes:
            with open(m.org / rel, "rb") as f:
                return f.read(4096)

        times, ok = [], True
        for _ in range(REPEAT):
            with mount(self.server, self.work) as m:
                os.stat(m.org / rel)
                t, data = timed(first)
                times.append(t)
                ok = ok and data == self.refs[rel][:4096]
                self.note(m)
        with mount(self.server, self.work) as m:
            t_cold, data = timed(first)
            ok = ok and data == self.refs[rel][:4096]
        plain = PlainClient(self.server)
        try:
            t_limit = statistics.median(
                timed(lambda: plain.get(rel, 0, 4096))[0] for _ in range(REPEAT)
            )
        finally:
            plain.close()
        self.results.append(
            Result(
                "g. time to first byte",
                "ms",
                statistics.median(times) * 1e3,
                t_limit * 1e3,
                "<= 3x limit",
                higher_is_better=False,
                extra={"cold_ms": t_cold * 1e3},
                verified=ok,
            )
        )


# -- the wide-area table (issue 11) ----------------------------------------------------


@contextlib.contextmanager
def tinyproxy(work: Path) -> Iterator[tuple[str, Path]]:
    """tinyproxy on loopback: its URL and its log (a `Request (...)` line a request)."""
    with process.tinyproxy(work) as (port, log):
        yield f"http://127.0.0.1:{port}", log


def proxied(url: str | None) -> dict[str, str | None]:
    """The environment changes that send a mount through url (None: through nothing),
    whatever the bench itself was started with."""
    names = [*PROXY_VARS, *(v.upper() for v in PROXY_VARS)]
    env: dict[str, str | None] = dict.fromkeys(names)
    if url:
        env.update(http_proxy=url, https_proxy=url)
    return env


def first_bytes(path: Path) -> tuple[float, float, bytes]:
    """Seconds to open path, seconds to its first 4 KiB from before the open, the bytes."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        t1 = time.perf_counter()
        data = os.pread(fd, 4096, 0)
        return t1 - t0, time.perf_counter() - t0, data
    finally:
        os.close(fd)


class WanBench(Bench):
    """Issue 11's table: each row under the network profile (the thin one and TLS on
    loopback say so), the plain client on one keep-alive connection as the reference,
    and what the link allows any client (`link`) as the bound.

    Rows run in the order of WAN_ROWS; sequential reads are md5-summed as they are
    timed, since md5 runs several times faster than the link."""

    def __init__(
        self,
        server: Server,
        work: Path,
        refs: dict[str, bytes],
        spec: str,
        thin: str,
        tls_server: Callable[[], contextlib.AbstractContextManager[Server]],
    ) -> None:
        super().__init__(server, work, refs)
        self.spec, self.thin = spec, thin
        self.profile = NetworkProfile.from_spec(spec)
        self.now = self.profile  # the profile the emulator plays at the moment
        self.tls_server = tls_server
        self.seq_cold: list[float] = []

    @property
    def rtt(self) -> float:
        return self.profile.rtt

    def cold_md5(
        self, server: Server, env: dict[str, str | None] | None = None
    ) -> tuple[list[float], bool]:
        """Seconds of REPEAT cold sequential reads of BIG, each on a fresh mount, and
        whether every one read the right bytes."""
        want = hashlib.md5(self.refs[BIG]).hexdigest()
        times, ok = [], True
        for _ in range(REPEAT):
            with mount(server, self.work, env=env) as m:
                t, got = timed(lambda: md5_of(m.org / BIG))
                self.note(m)
            ok = ok and got == want
            times.append(t)
        return times, ok

    def seq(self) -> None:
        mb = BIG_SIZE / 1e6
        plain = PlainClient(self.server)
        try:  # one run: the profile's pacing is what bounds it
            t_plain, got = timed(lambda: plain.drain(BIG))
        finally:
            plain.close()
        self.seq_cold, ok = self.cold_md5(self.server)
        link = self.profile.link / 1e6 if self.profile.link else None
        self.results.append(
            Result(
                "sequential 512 MiB, cold",
                "MB/s",
                mb / statistics.median(self.seq_cold),
                mb / t_plain,
                ">= 0.9x link",
                verified=ok and got == hashlib.md5(self.refs[BIG]).hexdigest(),
                bound=link,
                bound_note="(link)",
            )
        )

    def ttfb(self) -> None:
        """Open and first 4 KiB of small files: with nothing known (a fresh mount for
        each), and with their metadata known (stat()ed first, in one mount). Those files
        share a folder of 500; mid.bin, alone in its folder but for one, is the cold
        figure without a big folder's listing (`small_folder_ms`)."""
        rels = [f"{SMALL_ASSET}/feature/f{i:03d}.bin" for i in (7, 131, 262, 389, 455)]
        ok, opens, cold = True, [], []
        for rel in rels:
            with mount(self.server, self.work) as m:
                t_open, t, data = first_bytes(m.org / rel)
                self.note(m)
            ok = ok and data == self.refs[rel][:4096]
            opens.append(t_open)
            cold.append(t)
        with mount(self.server, self.work) as m:
            _, t_mid, data = first_bytes(m.org / MID)
            ok = ok and data == self.refs[MID][:4096]
        known: list[float] = []
        with mount(self.server, self.work) as m:
            # As `ls -l` learns them: a listing, then sizes. (A file stat()ed by name
            # alone has its first bytes on their way: that would be no first read.)
            os.listdir(m.org / SMALL_ASSET / "feature")
            for rel in rels:
                os.stat(m.org / rel)
            time.sleep(0.5)  # what the stats started settles before the clock runs
            before = stats(self.server)
            for rel in rels:
                _, t, data = first_bytes(m.org / rel)
                ok = ok and data == self.refs[rel][:4096]
                known.append(t)
            after = stats(self.server)
            self.note(m)
        fetched = after.get("files.download", 0) - before.get("files.download", 0)
        plain = PlainClient(self.server)
        try:
            plain.request(listing_query(SMALL_ASSET))  # the connection open and warm
            warm = [timed(partial(plain.get, rel, 0, 4096))[0] for rel in rels]
        finally:
            plain.close()
        fresh = [self.first_4k_fresh(rel) for rel in rels]
        rtt_ms = self.rtt * 1e3
        self.results.append(
            Result(
                "time to first byte, cold metadata",
                "ms",
                statistics.median(cold) * 1e3,
                statistics.median(fresh) * 1e3,
                f"<= {2 * rtt_ms + 10:.0f} ms (2 RTT + 10)",
                higher_is_better=False,
                extra={"open_ms": statistics.median(opens) * 1e3, "small_folder_ms": t_mid * 1e3},
                verified=ok,
                bound=2 * rtt_ms,
                bound_note="(2 RTT)",
            )
        )
        self.results.append(
            Result(
                "time to first byte, metadata known",
                "ms",
                statistics.median(known) * 1e3,
                statistics.median(warm) * 1e3,
                f"<= {rtt_ms + 5:.0f} ms (1 RTT + 5)",
                higher_is_better=False,
                extra={"downloads": float(fetched)},
                verified=ok,
                bound=rtt_ms,
                bound_note="(1 RTT)",
            )
        )

    def first_4k_fresh(self, rel: str) -> float:
        """The plain client's first 4 KiB on a connection of its own: connect, then one
        round trip; what a client that knows the fileUri pays on a fresh start."""
        plain = PlainClient(self.server)
        try:
            return timed(partial(plain.get, rel, 0, 4096))[0]
        finally:
            plain.close()

    def random(self, count: int = 200, name: str = "random 4 KiB reads", target: str = "") -> None:
        """Reads/s, and the bytes each miss moved: the emulator's count of body bytes
        sent, over the reads that took at least half a round trip (a read answered
        sooner cannot have waited for the network: a hit)."""
        size, ref = 4096, self.refs[BIG]
        rnd = random.Random(count)
        offsets = [rnd.randrange(0, BIG_SIZE - size) for _ in range(count)]
        lat: list[float] = []
        got: list[bytes] = []
        with mount(self.server, self.work) as m:
            fd = os.open(m.org / BIG, os.O_RDONLY)
            try:
                os.pread(fd, 1, 0)  # open and first block out of the way
                time.sleep(2 * self.rtt + 0.5)  # and whatever that read started
                before = stats(self.server)
                t0 = time.perf_counter()
                for off in offsets:
                    s = time.perf_counter()
                    got.append(os.pread(fd, size, off))
                    lat.append(time.perf_counter() - s)
                total = time.perf_counter() - t0
                time.sleep(2 * self.rtt + 0.5)  # bodies of fetches still under way
                after = stats(self.server)
            finally:
                os.close(fd)
            self.note(m)
        ok = all(g == ref[o : o + size] for g, o in zip(got, offsets, strict=True))
        plain = PlainClient(self.server)
        try:
            limit, _ = timed(lambda: [plain.get(BIG, off, size) for off in offsets])
        finally:
            plain.close()
        moved = after.get("files.download.bytes", 0) - before.get("files.download.bytes", 0)
        asked = after.get("files.download", 0) - before.get("files.download", 0)
        misses = sum(t >= self.rtt / 2 for t in lat) or count
        per_read = self.rtt + (size / self.now.conn if self.now.conn else 0.0)
        bdp = min(MiB, (self.now.link or self.now.conn or float(MiB)) * self.rtt)
        self.results.append(
            Result(
                name,
                "reads/s",
                count / total,
                count / limit,
                target or f"p50 <= {self.rtt * 1e3 + 10:.0f} ms, <= {bdp / 1024:.0f} KiB/miss",
                extra={
                    "p50_ms": statistics.median(lat) * 1e3,
                    "KiB_per_miss": moved / misses / 1024,
                    "misses": float(misses),
                    "requests": float(asked),
                },
                verified=ok,
                bound=1 / per_read if per_read else None,
                bound_note="(1 RTT each)",
            )
        )

    def thin_random(self) -> None:
        spec = thin_spec(self.profile, self.thin)
        self.now = NetworkProfile.from_spec(spec)
        self.server.set_network(spec)
        try:
            self.random(50, f"random 4 KiB reads, thin ({self.thin})", ">= 20 reads/s")
        finally:
            self.server.set_network(self.spec)
            self.now = self.profile

    def ls(self) -> None:
        folder = f"{SMALL_ASSET}/feature"
        times, ok, downloads = [], True, 0
        for _ in range(REPEAT):
            with mount(self.server, self.work) as m:
                before = stats(self.server)
                t, out = timed(
                    lambda: subprocess.run(
                        ["ls", "-l", str(m.org / folder)],
                        capture_output=True,
                        text=True,
                        check=True,
                        timeout=TIMEOUT,
                    )
                )
                after = stats(self.server)
                self.note(m)
            sized = [ln for ln in out.stdout.splitlines() if f" {SMALL_SIZE} " in ln]
            ok = ok and len(sized) == SMALL_COUNT
            downloads += after.get("files.download", 0) - before.get("files.download", 0)
            times.append(t)
        plain = PlainClient(self.server)
        try:
            plain.request(listing_query(ASSET))  # the connection open and warm
            t_plain, _ = timed(lambda: plain.request(listing_query(SMALL_ASSET)))
        finally:
            plain.close()
        self.results.append(
            Result(
                f"ls -l {SMALL_COUNT} files, cold (plain: one listing, no sizes)",
                "s",
                statistics.median(times),
                t_plain,
                "<= 0.6 s, 0 downloads",
                higher_is_better=False,
                extra={"downloads": float(downloads)},
                verified=ok and downloads == 0,
                bound=self.rtt,
                bound_note="(1 RTT)",
            )
        )

    def cp(self) -> None:
        folder = f"{SMALL_ASSET}/feature"
        rels = sorted(r for r in self.server.uris if r.startswith(folder))
        dest = self.work / "copy"

        def copy(m: Mounted) -> float:
            shutil.rmtree(dest, ignore_errors=True)
            t, _ = timed(
                lambda: subprocess.run(
                    ["cp", "-r", str(m.org / folder), str(dest)], check=True, timeout=TIMEOUT
                )
            )
            return t

        times, ok = [], True
        for _ in range(REPEAT):
            with mount(self.server, self.work) as m:
                times.append(copy(m))
                self.note(m)
            ok = ok and all((dest / Path(r).name).read_bytes() == self.refs[r] for r in rels)
        with mount(self.server, self.work) as m:
            subprocess.run(["ls", "-l", str(m.org / folder)], capture_output=True, check=True)
            after_ls = copy(m)
            self.note(m)
        ok = ok and all((dest / Path(r).name).read_bytes() == self.refs[r] for r in rels)
        shutil.rmtree(dest, ignore_errors=True)
        plain = PlainClient(self.server)
        try:  # one run: 500 round trips in a row hardly vary
            t_plain, _ = timed(lambda: [plain.get(r) for r in rels])
        finally:
            plain.close()
        size = SMALL_COUNT * SMALL_SIZE
        link = self.profile.link or self.profile.conn
        self.results.append(
            Result(
                f"cp -r {SMALL_COUNT} x 64 KiB, cold",
                "s",
                statistics.median(times),
                t_plain,
                "<= 1.5 s",
                higher_is_better=False,
                extra={"after_ls_s": after_ls},
                verified=ok,
                bound=self.rtt + size / link if link else self.rtt,
                bound_note="(RTT + bytes/link)",
            )
        )

    def tls(self) -> None:
        """On loopback, no profile: what TLS costs the read path itself."""
        mb = BIG_SIZE / 1e6
        with self.tls_server() as srv:
            srv.set_network("")
            try:
                curl(srv, BIG).wait()  # the server's file cache warm
                t_curl = statistics.median(timed(curl(srv, BIG).wait)[0] for _ in range(REPEAT))
                want = hashlib.md5(self.refs[BIG]).hexdigest()
                cold, ok = [], True
                for _ in range(REPEAT):
                    with mount(srv, self.work) as m:
                        cold.append(dd(m.org / BIG))
                        ok = ok and md5_of(m.org / BIG) == want
                        self.note(m)
            finally:
                srv.set_network(self.spec)
        self.results.append(
            Result(
                "loopback TLS, sequential 512 MiB cold (vs curl)",
                "MB/s",
                mb / statistics.median(cold),
                mb / t_curl,
                ">= 0.5x curl",
                verified=ok,
            )
        )

    def proxy(self) -> None:
        """Through tinyproxy (CONNECT for https), against the same reads without it."""
        mb = BIG_SIZE / 1e6
        direct, ok = self.seq_cold, True
        if not direct:
            direct, ok = self.cold_md5(self.server, env=proxied(None))
        with tinyproxy(self.work) as (url, log):
            through, ok_through = self.cold_md5(self.server, env=proxied(url))
            forwarded = log.read_text(errors="replace").count("Request (")
        self.results.append(
            Result(
                "through tinyproxy, sequential cold (vs without)",
                "MB/s",
                mb / statistics.median(through),
                mb / statistics.median(direct),
                ">= 0.8x without",
                extra={"proxied_requests": float(forwarded)},
                verified=ok and ok_through and forwarded > 0,
                bound=self.profile.link / 1e6 if self.profile.link else None,
                bound_note="(link)",
            )
        )

    def run(self, only: set[str]) -> None:
        rows: dict[str, Callable[[], None]] = {
            "seq": self.seq,
            "ttfb": self.ttfb,
            "random": self.random,
            "thin": self.thin_random,
            "ls": self.ls,
            "cp": self.cp,
            "tls": self.tls,
            "proxy": self.proxy,
        }
        for key in WAN_ROWS:
            if key in only:
                print(f"bench: {key}", flush=True)
                try:
                    rows[key]()
                except (
                    subprocess.SubprocessError,
                    OSError,
                    httpx.HTTPError,
                    RuntimeError,
                    EnosfsError,
                ) as exc:
                    # A row that failed says so; the rows after it still run.
                    print(f"bench: {key} failed: {exc}", flush=True)
                    self.results.append(
                        Result(f"{key}: FAILED", "-", float("nan"), None, "-", verified=False)
                    )


def thin_spec(profile: NetworkProfile, thin: str) -> str:
    """The thin link's caps with the main profile's round trips."""
    rtt = f"rtt={profile.rtt * 1e3:g}ms,connect={profile.connect * 1e3:g}ms"
    return f"{rtt},{thin}"


def stats(server: Server) -> dict[str, int]:
    try:
        r = httpx.get(f"{server.url}/__emulator__/stats", timeout=10, verify=server.verify)
        return dict(r.json()["requests"])
    except (httpx.HTTPError, ValueError, KeyError):
        return {}


def references(server: Server) -> dict[str, bytes]:
    refs = {
        f"{ASSET}/feature/big.bin": generated_bytes(BIG_SIZE, "big"),
        f"{ASSET}/feature/mid.bin": generated_bytes(MID_SIZE, "mid"),
    }
    for i in range(SMALL_COUNT):
        refs[f"{SMALL_ASSET}/feature/f{i:03d}.bin"] = generated_bytes(SMALL_SIZE, f"f{i:03d}")
    return refs


def table(results: list[Result], peak_rss: int, limit: str = "limit") -> str:
    """The rows as text; a link column only where some row has a bound."""
    linked = any(r.bound is not None for r in results)
    rows: list[tuple[str, ...]] = [
        ("workload", "enosfs", limit, "ratio", "link", "target", "bytes")
    ]
    for r in results:
        extra = "".join(f" {k}={v:.3g}" for k, v in r.extra.items() if isinstance(v, float))
        digits = 3 if r.unit == "s" else 1
        bound = "-" if r.bound is None else f"{r.bound:,.{digits}f} {r.unit} {r.bound_note}"
        rows.append(
            (
                r.name,
                f"{r.enosfs:,.{digits}f} {r.unit}{extra}",
                "-" if r.limit is None else f"{r.limit:,.{digits}f} {r.unit}",
                "-" if r.ratio is None else f"{r.ratio:.2f}x",
                bound.strip(),
                r.target,
                "ok" if r.verified else "WRONG",
            )
        )
    rows.append(
        (
            "h. peak RSS of the mount",
            f"{peak_rss / MiB:,.0f} MiB",
            "-",
            "-",
            "-",
            f"<= {(MEMORY_BUDGET + 80 * MiB) // MiB} MiB",
            "-",
        )
    )
    if not linked:
        rows = [r[:4] + r[5:] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--url",
        help="a running server loaded with the bench seed "
        "(see --write-seed); default: start the emulator. scale: an emulator started "
        "with the generated seed, its admin API reachable",
    )
    p.add_argument("--write-seed", metavar="DIR", help="write the bench seed and exit")
    p.add_argument("--data-dir", default=str(Path.home() / ".cache/enosfs/bench-data"))
    p.add_argument(
        "--json", help="where results go (bench-results.json, scale: bench-scale-results.json)"
    )
    p.add_argument(
        "--only",
        help="workloads to run, e.g. a,c (default a,c,d,e,f,g); scale: s1..s6 (default all); "
        f"wan: {','.join(WAN_ROWS)} (default all)",
    )
    p.add_argument("--config-extra", default="", help="TOML added to every mount's config")
    p.add_argument(
        "--profile",
        choices=("default", "wan", "scale"),
        default="default",
        help=f"wan: issue 11's table under --network (default {WAN}), about 10 minutes; "
        "scale: browsing a generated organisation 40 ms away (scripts/bench_scale.py)",
    )
    p.add_argument(
        "--network",
        metavar="rtt=40ms,connect=40ms,conn=25MB/s,link=125MB/s",
        help="play every workload across this link (the emulator's --network; connect "
        "defaults to rtt, to 2 x rtt with --tls)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve over HTTPS with a self-signed certificate the mount and clients trust",
    )
    p.add_argument(
        "--thin",
        default=THIN,
        help=f"wan: the thin link's caps, round trips as --network (default {THIN})",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=5000,
        help="scale: devices of the organisation (4 files each)",
    )
    p.add_argument(
        "--walk-timeout", type=float, default=600, help="scale: deadline of one walk, in seconds"
    )
    args = p.parse_args()
    if args.profile == "scale":
        import bench_scale  # scripts/ is this script's folder, first on sys.path

        return bench_scale.run(
            url=args.url,
            devices=args.devices,
            only=args.only,
            json_path=args.json or "bench-scale-results.json",
            timeout=args.walk_timeout,
            config_extra=args.config_extra.replace("\\n", "\n"),
        )
    wan = args.profile == "wan"
    args.json = args.json or "bench-results.json"
    args.only = args.only or (",".join(WAN_ROWS) if wan else "a,c,d,e,f,g")
    only = set(args.only.split(","))
    global EXTRA_CONFIG
    EXTRA_CONFIG = args.config_extra.replace("\\n", "\n")
    if args.write_seed:
        Path(args.write_seed).mkdir(parents=True, exist_ok=True)
        (Path(args.write_seed) / "seed.json").write_text(json.dumps(bench_seed()))
        return 0
    if args.tls and args.url:
        raise SystemExit("bench: --tls starts an emulator over HTTPS; give no --url")
    spec = network_spec(args.network or (WAN if wan else ""), args.tls)
    work = Path(tempfile.mkdtemp(prefix="enosfs-bench-"))
    data = Path(args.data_dir)
    try:
        with contextlib.ExitStack() as stack:
            if args.url is None:
                print("bench: starting the emulator (the first run builds ~0.6 GB of data)")
                cert = make_cert(work) if args.tls else None
                server = stack.enter_context(served(data, cert))
            else:
                server = Server(args.url)
                server.get_token()
                server.discover()
            refs = references(server)
            # Warm the server's own file cache so both sides read it from memory, on
            # loopback, before any profile slows it down.
            plain = PlainClient(server)
            for rel in (BIG, MID):
                plain.drain(rel)
            plain.close()
            if spec:
                server.set_network(spec)
            bench: Bench
            if wan:

                def tls_server() -> contextlib.AbstractContextManager[Server]:
                    if server.cafile:
                        return contextlib.nullcontext(server)
                    return served(data, make_cert(work))

                bench = WanBench(server, work, refs, spec, args.thin, tls_server)
                bench.run(only)
            else:
                bench = Bench(server, work, refs)
                run_default(bench, only)
                link = NetworkProfile.from_spec(spec).link if spec else 0
                for r in bench.results:
                    if link and r.unit == "MB/s":
                        r.bound, r.bound_note = link / 1e6, "(link)"
        print(table(bench.results, bench.peak_rss, "plain client" if wan else "limit"))
        doc = {
            "results": [{**r.__dict__, "ratio": r.ratio} for r in bench.results],
            "peak_rss_bytes": bench.peak_rss,
            "memory_budget_bytes": MEMORY_BUDGET,
            "url": server.url,
            "profile": args.profile,
            "network": spec,
            "tls": bool(server.cafile),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))
        print(f"bench: results written to {args.json}")
        return 0 if all(r.verified for r in bench.results) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_default(bench: Bench, only: set[str]) -> None:
    if "a" in only or "b" in only:
        bench.sequential()
    if "c" in only:
        bench.random_reads(2000, 4096, "c. 2000 random 4 KiB preads", ">= 2000 reads/s")
    if "d" in only:
        bench.random_reads(200, MiB, "d. 200 random 1 MiB preads", ">= 0.5x")
    if "e" in only:
        bench.parallel()
    if "f" in only:
        bench.small_files()
    if "g" in only:
        bench.first_byte()


def network_spec(spec: str, tls: bool) -> str:
    """The profile as the emulator takes it, checked here so that a typo fails before
    the emulator starts. Over TLS a new connection costs a second round trip (the
    handshake) unless connect= says otherwise."""
    if not spec:
        return ""
    try:
        profile = NetworkProfile.from_spec(spec)
    except NetworkError as exc:
        raise SystemExit(f"bench: --network: {exc}") from None
    named = {part.split("=", 1)[0].strip() for part in spec.split(",")}
    if tls and "connect" not in named and profile.rtt:
        spec += f",connect={2 * profile.rtt * 1e3:g}ms"
    return spec


def make_cert(work: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: the mount is told to trust
    it (network.ca_bundle), the plain client and curl too."""
    cert, key = work / "cert.pem", work / "key.pem"
    if not cert.exists():
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
                *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
                *("-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return cert, key


@contextlib.contextmanager
def served(data: Path, cert: tuple[Path, Path] | None) -> Iterator[Server]:
    """The emulator on the bench seed (its data built once, then reused), over HTTPS
    with cert; its token taken and its files found."""
    seed_dir = data / "seed"
    seed_dir.mkdir(parents=True, exist_ok=True)
    (seed_dir / "seed.json").write_text(json.dumps(bench_seed()))
    tls = ["--tls-cert", str(cert[0]), "--tls-key", str(cert[1])] if cert else []
    proc, url = start_emulator(data / "state", str(seed_dir), tls)
    try:
        server = Server(url, cafile=str(cert[0]) if cert else None)
        server.get_token()
        server.discover()
        yield server
    finally:
        stop_process(proc)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    raise SystemExit(main())
