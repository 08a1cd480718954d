"""scripts/soak: many readers against a misbehaving emulator, for a bounded time.

Readers do whole-file reads (checked against the file's md5) and random preads
(checked against the emulator's own copy of the bytes) while faults are switched on
and off: 5xx and 429, cut and stalled bodies, latency, error envelopes, revoked tokens,
a server that ignores Range. Then two phases of their own: a body that trickles (far
below the minimum speed), and bodies corrupted in flight while readers read the large
files whole (each such reading must end in EIO or the right md5; the corruption is
caught by the whole-file check at the end of the reading). Counts reads, bytes
verified, errors by errno, retries, wrong bytes and hangs (a system call slower than
the mount's deadline plus one second). Zero wrong bytes and zero hangs is the bar: the
exit status says whether it was met.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from enosfs.cli import default_demo_dir
from enosfs.emulator import process
from enosfs.emulator.demo import DEMO_APP_KEY, DEMO_APP_SECRET, DEMO_ORG
from enosfs.naming import feature_file_name, firmware_file_name

DEADLINE = 3.0  # the mount's network.timeout during the soak
HANG = DEADLINE + 1  # the promise for one system call (docs/SEMANTICS.md); more is a hang

FAULT_SETS: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    ("calm", [], {}),
    (
        "5xx",
        [
            {"kind": "error", "status": 503, "share": 0.3},
            {"kind": "error", "status": 500, "share": 0.1},
        ],
        {},
    ),
    ("429", [{"kind": "error", "status": 429, "seconds": 0.2, "share": 0.3}], {}),
    (
        "cut bodies",
        [
            {"kind": "reset", "after": 200_000, "share": 0.3, "match": "files.download"},
            {"kind": "short", "after": 50_000, "share": 0.1, "match": "files.download"},
        ],
        {},
    ),
    (
        "stalls",
        [
            {
                "kind": "stall",
                "after": 30_000,
                "seconds": 10,
                "share": 0.1,
                "match": "files.download",
            }
        ],
        {},
    ),
    ("latency", [{"kind": "latency", "seconds": 0.05, "share": 0.5}], {}),
    ("envelopes", [{"kind": "envelope", "code": 99500, "share": 0.2}], {}),
    ("no range", [], {"honour_range": False}),
    ("tokens", [], {"token_rejection": "envelope"}),
]
# Run after the sets above, each for --phase-seconds, in this order.
TRICKLE = (
    "trickle",
    [{"kind": "bandwidth", "rate": 1000, "share": 0.3, "match": "files.download"}],
    {},
)
# Random reads of a corrupted body cannot be checked (EnOS gives one digest per file),
# so during this phase readers only read large files whole, and it comes last.
CORRUPT = (
    "corrupt large",
    [{"kind": "corrupt", "after": 100_000, "share": 0.2, "match": "files.download"}],
    {},
)


def demo_files(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Path under the org folder -> blob record, from the emulator's state."""
    state = json.loads((data_dir / "state.json").read_text())
    blobs = {b["uri"]: b for b in state["blobs"]}
    org = next(o for o in state["orgs"] if o["org_id"] == DEMO_ORG)
    out: dict[str, dict[str, Any]] = {}
    for d in org["devices"]:
        values = list(d["attributes"].items()) + [(k, v[1]) for k, v in d["measurepoints"].items()]
        for ident, value in values:
            if isinstance(value, str) and value in blobs:
                out[f"{d['asset_id']}/feature/{feature_file_name(ident, value)}"] = blobs[value]
        for fw in org["firmwares"]:
            if fw["product_key"] == d["product_key"]:
                name = firmware_file_name(fw["name"], fw["version"], fw["file_uri"])
                out[f"{d['asset_id']}/ota/{name}"] = blobs[fw["file_uri"]]
    return out


class Soak:
    def __init__(
        self,
        mnt: Path,
        data_dir: Path,
        url: str,
        seconds: float,
        readers: int,
        phase_seconds: float = 15.0,
    ):
        self.org = mnt / DEMO_ORG
        self.data_dir = data_dir
        self.url = url
        self.mixed_until = time.monotonic() + seconds
        self.phase_seconds = phase_seconds
        self.until = self.mixed_until + 2 * phase_seconds
        self.whole_large_only = False
        self.readers = readers
        self.files = demo_files(data_dir)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.wrong: list[str] = []
        self.hangs: list[str] = []
        self.phases: list[str] = []
        self.fired: Counter[str] = Counter()

    def blob_path(self, blob: dict[str, Any]) -> Path:
        return self.data_dir / "blobs" / hashlib.sha256(blob["uri"].encode()).hexdigest()[:32]

    def timed(self, what: str, fn: Any) -> Any:
        start = time.monotonic()
        try:
            return fn()
        finally:
            took = time.monotonic() - start
            if took > HANG:
                phase = self.phases[-1] if self.phases else "?"
                with self.lock:
                    self.hangs.append(f"{what}: {took:.1f}s during {phase}")

    def reader(self, seed: int) -> None:
        rnd = random.Random(seed)
        names = sorted(self.files)
        large = [n for n in names if self.files[n]["size"] > 8 * 1024 * 1024]
        while time.monotonic() < self.until:
            whole_large = self.whole_large_only
            rel = rnd.choice(large if whole_large else names)
            blob = self.files[rel]
            path = self.org / rel
            try:
                if whole_large or blob["size"] < 8 * 1024 * 1024 or rnd.random() < 0.05:
                    self.whole(path, rel, blob)
                else:
                    self.random_reads(path, rel, blob, rnd)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                with self.lock:
                    self.errors[name] += 1

    def whole(self, path: Path, rel: str, blob: dict[str, Any]) -> None:
        h = hashlib.md5()
        n = 0
        with open(path, "rb", buffering=0) as f:
            # Out of the kernel's page cache, so the read reaches the mount. Not while
            # large files are corrupted: the mount starts each reading of an unchecked
            # large file with its pages dropped anyway, and dropping them under another
            # reader's feet makes the kernel read pages again, a reading the mount can
            # no longer vouch for (docs/SEMANTICS.md, "A whole-file check").
            if not self.whole_large_only:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while chunk := self.timed(f"read {rel}@{n}", lambda: f.read(1 << 20)):
                h.update(chunk)
                n += len(chunk)
        digest = h.hexdigest()
        with self.lock:
            self.counts["whole_reads"] += 1
            if digest != blob["md5"] or n != blob["size"]:
                self.wrong.append(f"{rel}: md5 {digest}, {n} of {blob['size']} bytes")
            else:
                self.counts["bytes_verified"] += n

    def random_reads(self, path: Path, rel: str, blob: dict[str, Any], rnd: random.Random) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            with open(self.blob_path(blob), "rb") as ref:
                for _ in range(20):
                    if self.whole_large_only:
                        break  # partial reads of corrupted bodies cannot be checked
                    off = rnd.randrange(blob["size"])
                    n = rnd.choice([1, 4096, 65536, 1 << 20])
                    got = self.timed(
                        f"pread {rel}@{off}", lambda n=n, off=off: os.pread(fd, n, off)
                    )
                    ref.seek(off)
                    want = ref.read(n)
                    with self.lock:
                        self.counts["preads"] += 1
                        if self.whole_large_only:
                            # The corrupt phase began during this read: a partial read
                            # of a corrupted body cannot be checked (docs/SEMANTICS.md).
                            self.counts["preads_unverifiable"] += 1
                        elif got != want[: len(got)]:
                            self.wrong.append(f"{rel}@{off}+{n}: the bytes differ")
                        elif len(got) < len(want):
                            # A call that failed part way: POSIX returns what was read
                            # before the error; the bytes are right, the next call errs.
                            self.counts["short_reads"] += 1
                        else:
                            self.counts["bytes_verified"] += len(got)
        finally:
            os.close(fd)

    def chaos(self, seed: int) -> None:
        rnd = random.Random(seed)
        with httpx.Client(base_url=f"{self.url}/__emulator__", timeout=10) as admin:
            defaults = admin.get("/switches").json()
            order = list(FAULT_SETS)
            rnd.shuffle(order)
            turn = 0
            while time.monotonic() < self.mixed_until:
                # Every set in turn, in a shuffled order, so a short soak still sees all.
                name, faults, switches = order[turn % len(order)]
                turn += 1
                self.fired.update(admin.get("/faults").json()["fired"])
                admin.post("/switches", json={**defaults, **switches})
                admin.post("/faults", json={"faults": faults, "seed": rnd.randrange(1 << 30)})
                if name == "tokens":
                    admin.post("/tokens/revoke")
                self.phases.append(name)
                time.sleep(min(rnd.uniform(2, 4), max(0.0, self.mixed_until - time.monotonic())))
            for name, faults, switches in (TRICKLE, CORRUPT):
                self.fired.update(admin.get("/faults").json()["fired"])
                admin.post("/switches", json={**defaults, **switches})
                admin.post("/faults", json={"faults": faults, "seed": rnd.randrange(1 << 30)})
                self.whole_large_only = name == CORRUPT[0]
                self.phases.append(name)
                time.sleep(max(0.0, min(self.phase_seconds, self.until - time.monotonic())))
            self.fired.update(admin.get("/faults").json()["fired"])
            admin.delete("/faults")
            admin.post("/switches", json=defaults)

    def run(self) -> None:
        threads = [threading.Thread(target=self.reader, args=(i,)) for i in range(self.readers)]
        threads.append(threading.Thread(target=self.chaos, args=(12345,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, self.until - time.monotonic()) + 60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--readers", type=int, default=8)
    p.add_argument(
        "--phase-seconds", type=float, default=15.0, help="length of the trickle and corrupt phases"
    )
    p.add_argument("--json", default="soak-results.json")
    p.add_argument("--data-dir", default=str(default_demo_dir()))
    args = p.parse_args()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="enosfs-soak-"))
    mnt = work / "mnt"
    mnt.mkdir()
    print("soak: starting the emulator", flush=True)
    emu, url = process.start_emulator(data_dir)
    mount = None
    try:
        cfg = work / "soak.toml"
        cfg.write_text(
            f'[enos]\ngateway = "{url}"\napp_key = "{DEMO_APP_KEY}"\n'
            f'[[org]]\nid = "{DEMO_ORG}"\n[cache]\nmemory = "128MiB"\n'
            f'metadata_ttl = "2s"\n[network]\ntimeout = "{DEADLINE}s"\n'
        )
        log = work / "mount.log"
        mount = process.mount_in_background(
            cfg, mnt, DEMO_APP_SECRET, "--log-file", str(log), stdout=None
        )
        try:
            process.wait_mounted(mnt, mount)
        except process.MountFailed:
            print("soak: the mount did not start", file=sys.stderr)
            return 1
        print(f"soak: {args.readers} readers for {args.seconds:.0f}s, faults switching", flush=True)
        soak = Soak(mnt, data_dir, url, args.seconds, args.readers, args.phase_seconds)
        soak.run()
        alive = mount.poll() is None
    finally:
        if mount is not None:
            process.unmount_and_wait(mnt, mount)
        process.stop_process(emu)
    text = log.read_text(errors="replace")
    retries = re.findall(r'"retries": (\d+)', text)
    caught = re.findall(r'"integrity_failures": (\d+)', text)
    bad_blocks = re.findall(r'"bad_blocks": (\d+)', text)
    slow = re.findall(r'"slow_bodies": (\d+)', text)
    unchecked = re.findall(r'"broken": (\d+)', text)
    report = {
        "seconds": args.seconds,
        "readers": args.readers,
        "whole_reads": soak.counts["whole_reads"],
        "preads": soak.counts["preads"],
        "bytes_verified": soak.counts["bytes_verified"],
        "short_reads": soak.counts["short_reads"],
        "preads_unverifiable": soak.counts["preads_unverifiable"],
        "errors_by_errno": dict(soak.errors),
        "retries": int(retries[-1]) if retries else None,
        "corruptions_caught": int(caught[-1]) if caught else None,
        "bad_blocks_caught": int(bad_blocks[-1]) if bad_blocks else None,
        "readings_unchecked": int(unchecked[-1]) if unchecked else None,
        "slow_bodies_dropped": int(slow[-1]) if slow else None,
        "wrong_bytes": len(soak.wrong),
        "hangs": len(soak.hangs),
        "mount_stayed_up": alive,
        "fault_phases": Counter(soak.phases),
        "faults_fired": dict(soak.fired),
        "examples": {"wrong": soak.wrong[:5], "hangs": soak.hangs[:5]},
    }
    Path(args.json).write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"{key:>16}: {value}")
    ok = not soak.wrong and not soak.hangs and alive
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
