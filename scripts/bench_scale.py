"""scripts/bench --profile scale: a big organisation, far away, behind a rate limit.

The default profile measures reading bytes; this one measures browsing: a generated
organisation of N devices (4 files each: two FILE attributes, one FILE measurement
point, one firmware), the emulator playing a gateway 40 ms away and, for one row, one
that allows 50 requests a second. What bounds a walk there is round trips and the
gateway's patience, so every row counts the API calls the emulator saw (reset before
each mount) next to its time. Each walk has a deadline: a row that passes it says
TIMEOUT and the next one runs. Measures; asserts nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
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

import httpx

from enosfs.emulator import process
from enosfs.emulator.demo import DEMO_APP_KEY, DEMO_APP_SECRET, DEMO_ORG

MiB = 1024 * 1024
FILES_PER_DEVICE = 4  # attrs=2 + points=1 + firmware=1 of the device's product
RTT = 0.040
FAR = f"rtt={RTT * 1000:g}ms"  # a wide-area round trip per request, one more per connection
RATE_LIMIT_PER_S = 50
RATE_LIMIT = f"{RATE_LIMIT_PER_S}/s"
RATE_GOAL = 55.0  # requests a second the gateway may see, refused ones included
MEMORY_BUDGET = 512 * MiB
RSS_ALLOWANCE = 150 * MiB
ROWS = ("s1", "s2", "s3", "s4", "s5", "s6")
# Request kinds as the emulator counts them ("service.action"); its other counters
# (ratelimit.429, faults.*, files.download.full, connections) are details of these.
SERVICES = {"token", "files", "integration", "devices", "thing-models", "measurepoints"}
SERVICES |= {"ota-firmwares"}
SHORT = {
    "devices.search": "search",
    "devices.get": "device",
    "measurepoints.queryLatest": "latest",
    "files.getFileInfo": "info",
    "files.download": "download",
    "thing-models.get": "model",
    "ota-firmwares.search": "firmware",
    "token.get": "token",
    "ratelimit.429": "429",
}


def seed_spec(devices: int) -> str:
    return f"generate:devices={devices},models=1,products=5,attrs=2,points=1,firmware=1"


def requests_of(counts: dict[str, int]) -> dict[str, int]:
    """The emulator's counters that are requests, one each."""
    return {k: v for k, v in counts.items() if k.count(".") == 1 and k.split(".")[0] in SERVICES}


def api_calls(counts: dict[str, int]) -> int:
    """Calls to EnOS's APIs; the token service is left out (a mount takes one token
    whatever it then does)."""
    return sum(v for k, v in requests_of(counts).items() if not k.startswith("token."))


def compact(counts: dict[str, int]) -> str:
    shown = {**requests_of(counts), "ratelimit.429": counts.get("ratelimit.429", 0)}
    parts = [f"{SHORT.get(k, k)}={v}" for k, v in sorted(shown.items()) if v]
    return " ".join(parts) or "none"


# -- the emulator ------------------------------------------------------------------------


@dataclass
class Gateway:
    """The emulator, driven through its admin API."""

    url: str

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        r = httpx.request(method, f"{self.url}/__emulator__/{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.json()

    def profile(self, network: str = "", rate_limit: str | None = None) -> None:
        self.admin("POST", "network", {"network": network, "rate_limit": rate_limit})

    def reset(self) -> None:
        self.admin("POST", "stats/reset")

    def counts(self) -> dict[str, int]:
        return dict(self.admin("GET", "stats")["requests"])

    def peak_seen(self) -> int | None:
        """The most calls the gateway saw in any second, refused ones included,
        counted by the emulator itself (sampling its counters from here is skewed by
        how late each sample's answer comes)."""
        limit = self.admin("GET", "stats").get("rate_limit")
        return None if limit is None else int(limit["peak_seen"])

    def search_page_time(self) -> float:
        """The floor of a cold walk: one device-search page (200 devices, the most the
        API gives) by a plain client on a warm connection, median of three."""
        with httpx.Client(timeout=60) as c:
            token = process.plain_token(c, self.url, DEMO_APP_KEY, DEMO_APP_SECRET)

            def page() -> None:
                c.post(
                    f"{self.url}/connect-service/v2.1/devices",
                    params={"action": "search", "orgId": DEMO_ORG},
                    headers={"apim-accesstoken": token},
                    json={"pagination": {"pageNo": 1, "pageSize": 200}},
                ).raise_for_status()

            page()  # the connection's own cost out of the way
            return statistics.median(timed(page) for _ in range(3))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class RateWatch:
    """Requests a second the gateway sees, sampled each second from its counters while a
    walk runs; the peak is what a rate limit is about, the mean what the walk got."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.rates: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rate-watch", daemon=True)

    def _run(self) -> None:
        last_t, last_n = time.perf_counter(), self._total()
        while not self._stop.wait(1.0):
            t, n = time.perf_counter(), self._total()
            self.rates.append((n - last_n) / (t - last_t))
            last_t, last_n = t, n

    def _total(self) -> int:
        try:
            return sum(requests_of(self.gateway.counts()).values())
        except httpx.HTTPError:
            return 0

    def __enter__(self) -> RateWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# -- mounts and walks --------------------------------------------------------------------


@dataclass
class ScaleMount:
    proc: subprocess.Popen[bytes]
    path: Path
    log: Path
    baseline_rss: int = 0

    @property
    def org(self) -> Path:
        return self.path / DEMO_ORG

    def peak_rss(self) -> int:
        return _proc_status(self.proc.pid, "VmHWM:")

    def own_stats(self) -> dict[str, Any]:
        """The mount's /.enosfs/stats, {} if it cannot be read."""
        try:
            return dict(json.loads((self.path / ".enosfs" / "stats").read_text()))
        except (OSError, ValueError):
            return {}

    def cpu_seconds(self) -> float:
        """CPU the mount process has used (user + system): what a walk costs it, far
        less noisy than wall time on a machine shared with other work."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return 0.0

    def fuse_ops(self) -> dict[str, int]:
        """Requests from the kernel so far, by kind (the mount's stats)."""
        return dict(self.own_stats().get("kernel", {}).get("ops", {}))

    @contextlib.contextmanager
    def costs(self, row: Row) -> Iterator[None]:
        """The mount's CPU and the kernel's requests of what runs inside, into the row:
        a walk over a warm tree is bound by the number of FUSE requests."""
        cpu, ops = self.cpu_seconds(), self.fuse_ops()
        yield
        after = self.fuse_ops()
        row.extra["mount_cpu_s"] = round(self.cpu_seconds() - cpu, 2)
        row.extra["fuse_ops"] = {
            k: n - ops.get(k, 0) for k, n in after.items() if n > ops.get(k, 0)
        }

    def logged_errors(self) -> list[str]:
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").splitlines()
            return [ln for ln in lines if "ERROR" in ln or "Traceback" in ln]
        return []


def _proc_status(pid: int, key: str) -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Walk:
    """A command run over the mount with a deadline: seconds taken (None: it timed
    out), exit status and what it wrote."""

    seconds: float | None
    returncode: int | None
    out: Path
    err: str

    @property
    def lines(self) -> list[str]:
        with contextlib.suppress(OSError):
            return self.out.read_text(errors="replace").splitlines()
        return []


def walk(cmd: list[str], out: Path, timeout: float) -> Walk:
    """Run cmd with its output in a file (as `> file` would: no pipe for Python to keep
    up with); killed at the deadline."""
    with out.open("wb") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            _, err = proc.communicate(timeout=timeout)
            return Walk(
                time.perf_counter() - t0, proc.returncode, out, err.decode(errors="replace")
            )
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
            return Walk(None, None, out, "")


# -- rows --------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    name: str
    goal: str
    seconds: float | None = None  # None: not measured (timed out, mount failed)
    value: str = ""  # as shown, when not seconds
    limit: float | None = None  # a plain client's or the local disk's time
    limit_what: str = ""
    calls: dict[str, int] = field(default_factory=dict)
    met: bool = False
    verified: bool = True
    status: str = ""  # TIMEOUT, FAILED, ...: overrides ok/MISS
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def result(self) -> str:
        if self.status:
            return self.status
        if not self.verified:
            return "WRONG"
        return "ok" if self.met else "MISS"


class ScaleBench:
    def __init__(
        self, gateway: Gateway, work: Path, devices: int, timeout: float, extra: str = ""
    ) -> None:
        self.gw = gateway
        self.extra = extra  # --config-extra
        self.work = work
        self.devices = devices
        self.files = devices * FILES_PER_DEVICE
        self.timeout = timeout
        self.rows: list[Row] = []
        self.rss: list[tuple[int, str]] = []  # (peak RSS, row) of every mount
        self.baseline_rss: list[int] = []
        self.paths: list[str] = []  # files under ORG, from the first complete find
        self.persistent: Path | None = None  # the cache folder a cold find filled
        self.persisted_at = 0.0
        self._mirror: Path | None = None
        self._n = 0
        self._page: float | None = None

    # -- plumbing

    def fresh(self, name: str) -> Path:
        self._n += 1
        p = self.work / f"{self._n:02d}-{name}"
        p.mkdir(parents=True)
        return p

    @contextlib.contextmanager
    def mount(self, cache_dir: Path, row: str) -> Iterator[ScaleMount]:
        """A mount with default settings but a cache folder (where the metadata that
        survives a remount lives); its log goes to a file, counted for errors."""
        where = self.fresh("mount")
        mnt = where / "mnt"
        mnt.mkdir()
        cfg = where / "scale.toml"
        cfg.write_text(
            f'[enos]\ngateway = "{self.gw.url}"\napp_key = "{DEMO_APP_KEY}"\n'
            f'[[org]]\nid = "{DEMO_ORG}"\n'
            f'[cache]\nmemory = "{MEMORY_BUDGET}"\ndir = "{cache_dir}"\n{self.extra}\n'
        )
        log = where / "mount.log"
        with log.open("wb") as logf:
            proc = process.mount_in_background(
                cfg, mnt, DEMO_APP_SECRET, "--log-level", "warning", stderr=logf
            )
            m = ScaleMount(proc, mnt, log)
            try:
                process.wait_mounted(mnt, proc)
                m.baseline_rss = _proc_status(proc.pid, "VmRSS:")
                self.baseline_rss.append(m.baseline_rss)
                yield m
            finally:
                self.rss.append((m.peak_rss(), row))
                process.unmount_and_wait(mnt, proc)
                if process.is_mounted(mnt):  # a walk left hanging: let the kernel drop it
                    subprocess.run(["fusermount3", "-uz", str(mnt)], check=False, timeout=30)

    def page_time(self) -> float:
        """One device-search page at 40 ms, measured once."""
        if self._page is None:
            self.gw.profile(FAR)
            self._page = self.gw.search_page_time()
        return self._page

    def mirror(self) -> Path | None:
        """The same tree on local disk (empty files): the floor of a walk the kernel
        answers from its own caches, without FUSE."""
        if self._mirror is None and self.paths:
            root = self.fresh("mirror") / DEMO_ORG
            for rel in self.paths:
                p = root / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.touch()
            self._mirror = root
        return self._mirror

    def find(self, m: ScaleMount, tag: str) -> tuple[Walk, int]:
        w = walk(["find", str(m.org), "-type", "f"], self.fresh(tag) / "find.out", self.timeout)
        found = [ln[len(str(m.org)) + 1 :] for ln in w.lines]
        if w.seconds is not None and not self.paths and len(found) == self.files:
            self.paths = found
        return w, len(found)

    def ls(self, m: ScaleMount, tag: str, timeout: float | None = None) -> tuple[Walk, int, int]:
        """ls -lR; returns the walk, the files it listed and how many of those showed
        size 0 (every generated file has bytes: a 0 is a size handed out unknown)."""
        out = self.fresh(tag) / "ls.out"
        w = walk(["ls", "-lR", str(m.org)], out, timeout or self.timeout)
        files = zero = 0
        for line in w.lines:
            if line.startswith("-"):
                files += 1
                fields = line.split()
                zero += len(fields) > 4 and fields[4] == "0"
        return w, files, zero

    def finish(
        self, row: Row, w: Walk, m: ScaleMount, found: int, want: int, goal: Callable[[], bool]
    ) -> None:
        row.calls = self.gw.counts()
        mount_errors = {k: v for k, v in m.own_stats().get("errors", {}).items() if k != "ENOENT"}
        logged = m.logged_errors()
        row.extra.update(found=found, want=want)
        if mount_errors:
            row.extra["mount_errno"] = mount_errors
        if logged:
            row.extra["mount_log_errors"] = len(logged)
            row.extra["first_log_error"] = logged[0][:200]
        if w.seconds is None:
            row.status = "TIMEOUT"
            row.extra["timeout_s"] = self.timeout
            return
        row.seconds = w.seconds
        row.verified = found == want and w.returncode == 0
        if w.err.strip():
            row.extra["stderr_lines"] = len(w.err.splitlines())
            row.extra["first_stderr"] = w.err.splitlines()[0][:200]
        row.met = goal()

    @staticmethod
    def overlap(row: Row) -> None:
        """Calls in flight on average (calls x round trip / time): what a cold walk 40 ms
        away is bound by, next to the mount's max_api_concurrency."""
        if row.seconds:
            row.extra["in_flight"] = api_calls(row.calls) * RTT / row.seconds

    def run_row(self, row: Row, fn: Callable[[Row], None]) -> None:
        print(f"bench: {row.key}. {row.name} ...", flush=True)
        try:
            fn(row)
        except process.MountFailed as exc:
            row.status = "FAILED"
            row.extra["error"] = str(exc)[:300]
        finally:
            self.gw.profile()
        self.rows.append(row)
        shown = f"{row.seconds:.2f} s" if row.seconds is not None else row.value or "-"
        print(f"bench: {row.key}. {shown}  {row.result}  [{compact(row.calls)}]", flush=True)

    # -- the workloads

    def cold_find(self, row: Row) -> None:
        row.limit, row.limit_what = self.page_time(), "1 search page"
        cache = self.fresh("cache")
        self.gw.profile(FAR)
        self.gw.reset()
        with self.mount(cache, row.key) as m:
            w, found = self.find(m, "find-cold")
            self.finish(
                row,
                w,
                m,
                found,
                self.files,
                lambda: (
                    row.seconds is not None
                    and row.seconds <= 15
                    and row.calls.get("files.getFileInfo", 0) == 0
                ),
            )
            self.overlap(row)
        self.persistent, self.persisted_at = cache, time.monotonic()

    def remount_find(self, row: Row) -> None:
        if self.persistent is None:  # s1 not asked for: fill a cache folder unreported
            prep = Row("s1", "(preparation: a cold find to fill the cache folder)", "")
            self.cold_find(prep)
            row.extra["prepared_s"] = prep.seconds
        assert self.persistent is not None
        # Past metadata_ttl (60 s by default) a remount may rightly revalidate.
        row.extra["metadata_age_s"] = time.monotonic() - self.persisted_at
        self.gw.profile(FAR)
        self.gw.reset()
        with self.mount(self.persistent, row.key) as m:
            with m.costs(row):
                w, found = self.find(m, "find-remount")
            self.finish(
                row,
                w,
                m,
                found,
                self.files,
                lambda: row.seconds is not None and row.seconds <= 3 and api_calls(row.calls) == 0,
            )
        mirror = self.mirror()
        if mirror is not None:
            row.limit = timed(
                lambda: subprocess.run(
                    ["find", str(mirror), "-type", "f"],
                    stdout=subprocess.DEVNULL,
                    timeout=self.timeout,
                    check=False,
                )
            )
            row.limit_what = "local disk"

    def cold_ls(self, row: Row) -> None:
        row.limit, row.limit_what = self.page_time(), "1 search page"
        self.gw.profile(FAR)
        self.gw.reset()
        with self.mount(self.fresh("cache"), row.key) as m:
            w, files, zero = self.ls(m, "ls-cold")
            row.extra["zero_sizes"] = zero
            self.finish(
                row, w, m, files, self.files, lambda: row.seconds is not None and row.seconds <= 60
            )
            self.overlap(row)
            row.verified = row.verified and zero == 0

    def warm_ls(self, row: Row) -> None:
        """On loopback: a first ls -lR fills the metadata (reported as cold_loopback_s,
        with its calls), the second is the row."""
        self.gw.profile()
        self.gw.reset()
        with self.mount(self.fresh("cache"), row.key) as m:
            first, _, _ = self.ls(m, "ls-first")
            row.extra["cold_loopback_s"] = first.seconds
            row.extra["cold_loopback_calls"] = compact(self.gw.counts())
            if first.seconds is None:
                row.status = "TIMEOUT"
                row.extra["timeout_s"] = self.timeout
                return
            self.gw.reset()
            with m.costs(row):
                w, files, zero = self.ls(m, "ls-warm")
            row.extra["zero_sizes"] = zero
            self.finish(
                row, w, m, files, self.files, lambda: row.seconds is not None and row.seconds <= 3
            )
            row.verified = row.verified and zero == 0
            if not self.paths:  # for the local mirror: metadata is warm, this is cheap
                self.find(m, "find-warm")
        mirror = self.mirror()
        if mirror is not None:
            row.limit = timed(
                lambda: subprocess.run(
                    ["ls", "-lR", str(mirror)],
                    stdout=subprocess.DEVNULL,
                    timeout=self.timeout,
                    check=False,
                )
            )
            row.limit_what = "local disk"

    def limited_ls(self, row: Row) -> None:
        """Cold, 40 ms away, 50 requests a second: the walk needs about 4 calls a
        device, so its deadline grows with the organisation."""
        timeout = max(self.timeout, 2 * FILES_PER_DEVICE * self.devices / RATE_LIMIT_PER_S + 120)
        self.gw.profile(FAR, RATE_LIMIT)
        self.gw.reset()
        with self.mount(self.fresh("cache"), row.key) as m:
            with RateWatch(self.gw) as watch:
                w, files, zero = self.ls(m, "ls-limited", timeout)
            own = m.own_stats()
            rates = watch.rates
            peak = self.gw.peak_seen()
            row.extra.update(
                peak_rps=float(peak) if peak is not None else max(rates, default=0.0),
                sampled_peak_rps=round(max(rates, default=0.0), 1),
                mean_rps=0.0
                if not w.seconds
                else sum(requests_of(self.gw.counts()).values()) / w.seconds,
                zero_sizes=zero,
                throttle=own.get("throttle"),
                retries=own.get("retries"),
            )

            def goal() -> bool:
                errors = (
                    row.extra.get("stderr_lines", 0)
                    + sum(row.extra.get("mount_errno", {}).values())
                    + row.extra.get("mount_log_errors", 0)
                )
                row.extra["errors"] = errors
                return errors == 0 and row.extra["peak_rps"] <= RATE_GOAL

            self.finish(row, w, m, files, self.files, goal)
            # The floor the limit alone sets: the calls that got through, at 50 a second.
            counts = self.gw.counts()
            admitted = sum(requests_of(counts).values()) - counts.get("ratelimit.429", 0)
            row.limit, row.limit_what = admitted / RATE_LIMIT_PER_S, "admitted calls at 50/s"
            if row.status == "TIMEOUT":
                row.extra["timeout_s"] = timeout
            row.verified = row.verified and zero == 0

    def memory(self, row: Row) -> None:
        if not self.rss:
            row.status = "NOT RUN"
            row.value = "needs s1-s5"
            return
        peak, where = max(self.rss)
        limit = MEMORY_BUDGET + RSS_ALLOWANCE
        row.value = f"{peak / MiB:,.0f} MiB"
        row.extra.update(
            peak_rss_bytes=peak,
            in_row=where,
            baseline_rss_mib=round(min(self.baseline_rss, default=0) / MiB, 1),
            holds_all_metadata=where in ("s3", "s4", "s5"),
        )
        row.met = peak <= limit

    def run(self, only: set[str]) -> None:
        n = f"{self.devices:,} devices, {self.files:,} files"
        plan: list[tuple[str, str, str, Callable[[Row], None]]] = [
            ("s1", f"find ORG -type f, cold, 40 ms away ({n})", "<= 15 s, 0 info", self.cold_find),
            ("s2", "find ORG -type f after a remount, cache_dir kept", "<= 3 s, 0 calls",
             self.remount_find),
            ("s3", "ls -lR ORG, cold, 40 ms away", "<= 60 s", self.cold_ls),
            ("s4", "ls -lR ORG, warm metadata, loopback", "<= 3 s", self.warm_ls),
            ("s5", "ls -lR ORG, cold, 40 ms away, 50 requests/s", "0 errors, <= 55 req/s",
             self.limited_ls),
            ("s6", "peak RSS of the mount (metadata of every file)",
             f"<= {(MEMORY_BUDGET + RSS_ALLOWANCE) // MiB} MiB", self.memory),
        ]  # fmt: skip
        for key, name, goal, fn in plan:
            if key in only:
                self.run_row(Row(key, name, goal), fn)


# -- the report --------------------------------------------------------------------------


def _shown_extra(extra: dict[str, Any]) -> str:
    keep = (
        "in_flight",
        "cold_loopback_s",
        "metadata_age_s",
        "peak_rps",
        "mean_rps",
        "errors",
        "zero_sizes",
        "baseline_rss_mib",
        "mount_cpu_s",
    )
    parts = []
    ops = extra.get("fuse_ops")
    if ops:
        parts.append(f"fuse_ops={sum(ops.values())}")
    for k in keep:
        v = extra.get(k)
        if isinstance(v, float):
            parts.append(f"{k}={v:.3g}")
        elif isinstance(v, int) and (v or k == "errors"):
            parts.append(f"{k}={v}")
    return " ".join(parts)


def table(rows: list[Row]) -> str:
    head = ("workload", "enosfs", "limit", "ratio", "goal", "result", "API calls")
    lines: list[tuple[str, ...]] = [head]
    for r in rows:
        value = f"{r.seconds:,.2f} s" if r.seconds is not None else (r.value or "-")
        extra = _shown_extra(r.extra)
        limit = "-" if r.limit is None else f"{r.limit:,.3f} s ({r.limit_what})"
        ratio = "-" if r.limit in (None, 0) or r.seconds is None else f"{r.seconds / r.limit:,.1f}x"
        calls = "-" if r.key == "s6" else compact(r.calls)
        lines.append(
            (
                f"{r.key}. {r.name}",
                f"{value} {extra}".strip(),
                limit,
                ratio,
                r.goal,
                r.result,
                calls,
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in lines
    )


def run(
    *,
    url: str | None,
    devices: int,
    only: str | None,
    json_path: str,
    timeout: float,
    config_extra: str = "",
) -> int:
    """The scale profile from start to end; 0 when every row met its goal."""
    chosen = set(only.split(",")) if only else set(ROWS)
    unknown = chosen - set(ROWS)
    if unknown:
        raise SystemExit(
            f"bench: no scale workload {', '.join(sorted(unknown))} ({', '.join(ROWS)})"
        )
    work = Path(tempfile.mkdtemp(prefix="enosfs-bench-scale-"))
    emulator = None
    try:
        if url is None:
            print(f"bench: starting the emulator with {seed_spec(devices)}", flush=True)
            emulator, url = process.start_emulator(work / "emulator", seed_spec(devices))
        bench = ScaleBench(Gateway(url), work, devices, timeout, config_extra)
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        bench.run(chosen)
        print(table(bench.rows))
        doc = {
            "profile": "scale",
            "devices": devices,
            "files": bench.files,
            "seed": seed_spec(devices),
            "network": FAR,
            "rate_limit": RATE_LIMIT,
            "memory_budget_bytes": MEMORY_BUDGET,
            "rows": [{**r.__dict__, "result": r.result} for r in bench.rows],
            "url": url,
            "started": started,
            "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        Path(json_path).write_text(json.dumps(doc, indent=2, default=str))
        print(f"bench: results written to {json_path}")
        return 0 if all(r.result == "ok" for r in bench.rows) else 1
    finally:
        if emulator is not None:
            process.stop_process(emulator)
        shutil.rmtree(work, ignore_errors=True)
