"""scripts/bench: enosfs against a plain HTTP client on the same server.

Each workload runs on a fresh mount (so the kernel's page cache and enosfs's own cache
are cold) unless it is marked warm, and the same workload done by a plain HTTP client
against the same server gives the limit. Every byte read is checked against the
reference. Prints a table of values and ratios and writes JSON. Measures; asserts
nothing.

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
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

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

MiB = 1024 * 1024
ORG, APP_KEY, APP_SECRET = "o-bench", "bench-app", "bench-secret"
ASSET, SMALL_ASSET = "BENCH-1", "BENCH-SMALL"
BIG_SIZE, MID_SIZE, SMALL_SIZE, SMALL_COUNT = 512 * MiB, 64 * MiB, 64 * 1024, 500
MEMORY_BUDGET = 512 * MiB
REPEAT = 3
EXTRA_CONFIG = ""  # --config-extra: more TOML for every mount
TIMEOUT = 600


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

    def get_token(self) -> None:
        with httpx.Client() as c:
            self.token = plain_token(c, self.url, APP_KEY, APP_SECRET)

    def discover(self) -> None:
        h = {"apim-accesstoken": self.token}
        for asset in (ASSET, SMALL_ASSET):
            r = httpx.get(
                f"{self.url}/connect-service/v2.1/devices",
                headers=h,
                timeout=30,
                params={"action": "get", "orgId": ORG, "assetId": asset},
            )
            for ident, uri in r.json()["data"]["deviceAttributes"].items():
                self.uris[f"{asset}/feature/{ident}.bin"] = uri

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


class PlainClient:
    """The limit: http.client on one keep-alive connection, no cache, no FUSE."""

    def __init__(self, server: Server) -> None:
        parts = urlsplit(server.url)
        self.server = server
        self.conn = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port, timeout=60
        )

    def get(self, rel: str, start: int | None = None, size: int | None = None) -> bytes:
        headers = {"apim-accesstoken": self.server.token}
        if start is not None and size is not None:
            headers["Range"] = f"bytes={start}-{start + size - 1}"
        self.conn.request("GET", self.server.path_query(rel), headers=headers)
        resp = self.conn.getresponse()
        return resp.read()

    def close(self) -> None:
        self.conn.close()


def curl(server: Server, rel: str) -> subprocess.Popen[bytes]:
    url = server.url + server.path_query(rel)
    return subprocess.Popen(
        ["curl", "-sf", "-o", "/dev/null", "-H", f"apim-accesstoken: {server.token}", url]
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
def mount(server: Server, work: Path, extra: str = "") -> Iterator[Mounted]:
    extra = EXTRA_CONFIG + "\n" + extra
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    cfg = work / "bench.toml"
    cfg.write_text(
        f'[enos]\ngateway = "{server.url}"\napp_key = "{APP_KEY}"\n'
        f'[[org]]\nid = "{ORG}"\n[cache]\nmemory = "{MEMORY_BUDGET}"\n{extra}\n'
    )
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


def stats(server: Server) -> dict[str, int]:
    try:
        return dict(httpx.get(f"{server.url}/__emulator__/stats", timeout=10).json()["requests"])
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


def table(results: list[Result], peak_rss: int) -> str:
    rows = [("workload", "enosfs", "limit", "ratio", "target", "bytes")]
    for r in results:
        extra = "".join(f" {k}={v:.3g}" for k, v in r.extra.items() if isinstance(v, float))
        digits = 3 if r.unit == "s" else 1
        rows.append(
            (
                r.name,
                f"{r.enosfs:,.{digits}f} {r.unit}{extra}",
                "-" if r.limit is None else f"{r.limit:,.{digits}f} {r.unit}",
                "-" if r.ratio is None else f"{r.ratio:.2f}x",
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
            f"<= {(MEMORY_BUDGET + 80 * MiB) // MiB} MiB",
            "-",
        )
    )
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
        help="workloads to run, e.g. a,c (default a,c,d,e,f,g); scale: s1..s6 (default all)",
    )
    p.add_argument("--config-extra", default="", help="TOML added to every mount's config")
    p.add_argument(
        "--profile",
        choices=("default", "scale"),
        default="default",
        help="scale: browsing a generated organisation 40 ms away (scripts/bench_scale.py)",
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
    args.json = args.json or "bench-results.json"
    args.only = args.only or "a,c,d,e,f,g"
    global EXTRA_CONFIG
    EXTRA_CONFIG = args.config_extra.replace("\\n", "\n")
    if args.write_seed:
        Path(args.write_seed).mkdir(parents=True, exist_ok=True)
        (Path(args.write_seed) / "seed.json").write_text(json.dumps(bench_seed()))
        return 0
    work = Path(tempfile.mkdtemp(prefix="enosfs-bench-"))
    emulator = None
    try:
        url = args.url
        if url is None:
            data = Path(args.data_dir)
            seed_dir = data / "seed"
            seed_dir.mkdir(parents=True, exist_ok=True)
            (seed_dir / "seed.json").write_text(json.dumps(bench_seed()))
            print("bench: starting the emulator (the first run builds ~0.6 GB of data)", flush=True)
            emulator, url = start_emulator(data / "state", str(seed_dir))
        server = Server(url)
        server.get_token()
        server.discover()
        refs = references(server)
        # Warm the server's own file cache so both sides read it from memory.
        plain = PlainClient(server)
        for rel in (f"{ASSET}/feature/big.bin", f"{ASSET}/feature/mid.bin"):
            plain.get(rel)
        plain.close()
        bench = Bench(server, work, refs)
        only = set(args.only.split(","))
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
        print(table(bench.results, bench.peak_rss))
        doc = {
            "results": [{**r.__dict__, "ratio": r.ratio} for r in bench.results],
            "peak_rss_bytes": bench.peak_rss,
            "memory_budget_bytes": MEMORY_BUDGET,
            "url": url,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))
        print(f"bench: results written to {args.json}")
        return 0 if all(r.verified for r in bench.results) else 1
    finally:
        if emulator is not None:
            stop_process(emulator)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    raise SystemExit(main())
