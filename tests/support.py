"""Test helpers: a real emulator process, real mounts in subprocesses, reference bytes.

Everything started here is ended here, by PID, and every mount is unmounted.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from enosfs.config import SECRET_ENV, Secret, Settings, settings_from_dict
from enosfs.emulator.content import GeneratedContent
from enosfs.emulator.demo import DEMO_APP_KEY, DEMO_APP_SECRET, DEMO_ORG
from enosfs.emulator.process import (
    MountFailed,
    is_mounted,
    mount_in_background,
    start_emulator,
    stop_process,
    unmount_and_wait,
    wait_mounted,
)


@dataclass
class Emulator:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    app_key: str = DEMO_APP_KEY
    app_secret: str = DEMO_APP_SECRET
    org: str = DEMO_ORG

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        r = httpx.request(method, f"{self.url}/__emulator__/{path}", json=body, timeout=10)
        r.raise_for_status()
        return r.json()

    def stats(self) -> dict[str, int]:
        return dict(self.admin("GET", "stats")["requests"])

    def reset_stats(self) -> None:
        self.admin("POST", "stats/reset")

    def switches(self, **changes: Any) -> dict[str, Any]:
        return dict(self.admin("POST", "switches", changes))

    def faults(self, *faults: dict[str, Any], seed: int = 1) -> None:
        self.admin("POST", "faults", {"faults": list(faults), "seed": seed})

    def network(self, **changes: Any) -> dict[str, Any]:
        """Change the network profile or rate limit at run time, e.g.
        network(network="rtt=40ms", rate_limit="50/s"); no arguments: show them."""
        if not changes:
            return dict(self.admin("GET", "network"))
        return dict(self.admin("POST", "network", changes))

    def replace_feature(self, asset: str, feature: str, **how: Any) -> None:
        """New content for a device's measurement-point file: `bytes`+`seed` (with
        `keep_uri` True, the same fileUri gets new bytes and a new ETag), or `text`+`name`
        (a new fileUri)."""
        body = {"orgId": self.org, "assetId": asset, "feature": feature, "kind": "measurepoints"}
        self.admin("POST", "replace", {**body, **how})

    def objectstore(self) -> dict[str, Any]:
        """The object store's URL and counters: requests, and those that carried the
        access token (which must stay 0)."""
        return dict(self.admin("GET", "stats")["objectstore"])

    def fired(self) -> dict[str, int]:
        return dict(self.admin("GET", "faults")["fired"])

    def state(self) -> dict[str, Any]:
        return dict(json.loads((self.data_dir / "state.json").read_text()))

    def blob(self, uri: str) -> bytes:
        """The bytes the emulator holds for a fileUri: the reference for every read.
        A generated seed's files are not on disk: they are made as the emulator makes them."""
        import hashlib

        name = hashlib.sha256(uri.encode()).hexdigest()[:32]
        path = self.data_dir / "blobs" / name
        if not path.exists():
            record = self.blobs().get(uri) or {}
            if record.get("gen"):
                return GeneratedContent(record["gen"], record["size"]).all_bytes()
        return path.read_bytes()

    def blobs(self) -> dict[str, dict[str, Any]]:
        return {b["uri"]: b for b in self.state()["blobs"]}

    def settings(self, **kw: Any) -> Settings:
        raw: dict[str, Any] = {
            "enos": {"gateway": self.url, "app_key": self.app_key},
            "org": [{"id": self.org}],
        }
        for section, values in kw.items():
            raw[section] = values
        return settings_from_dict(raw, {SECRET_ENV: self.app_secret})


@contextmanager
def emulator(data_dir: Path, seed: str = "demo", *extra: str) -> Iterator[Emulator]:
    data_dir.mkdir(parents=True, exist_ok=True)
    proc, url = start_emulator(data_dir, seed, extra)
    try:
        yield Emulator(proc, url, data_dir)
    finally:
        stop_process(proc)


def write_config(path: Path, emu: Emulator, extra: str = "") -> Path:
    path.write_text(
        f'[enos]\ngateway = "{emu.url}"\napp_key = "{emu.app_key}"\n\n'
        f'[[org]]\nid = "{emu.org}"\n\n{extra}\n'
    )
    return path


def secret_env(secret: str | Secret) -> dict[str, str]:
    env = dict(os.environ)
    env[SECRET_ENV] = secret.reveal() if isinstance(secret, Secret) else secret
    return env


@dataclass
class Mount:
    proc: subprocess.Popen[bytes]
    path: Path
    log: Path
    stderr: str = ""  # what the mount wrote to stderr, once it has exited

    @property
    def org(self) -> Path:
        return self.path / DEMO_ORG

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@contextmanager
def mounted(
    tmp: Path, emu: Emulator, extra_config: str = "", *args: str, secret: str | None = None
) -> Iterator[Mount]:
    """`enosfs mount -f` in a subprocess, ready when the kernel shows the mount."""
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    cfg = write_config(tmp / "enosfs.toml", emu, extra_config)
    log = tmp / "mount.log"
    proc = mount_in_background(
        cfg,
        mnt,
        secret or emu.app_secret,
        "--log-level",
        "debug",
        "--log-file",
        str(log),
        *args,
        stderr=subprocess.PIPE,
    )
    try:
        try:
            wait_mounted(mnt, proc)
        except MountFailed as exc:
            raise AssertionError(str(exc)) from None
        mount = Mount(proc, mnt, log)
        yield mount
    finally:
        unmount_and_wait(mnt, proc, timeout=30)
        if proc.stderr:
            if "mount" in locals():
                mount.stderr = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
        assert not is_mounted(mnt), "mount left behind"


def run(*cmd: str | Path, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def enosfs(*args: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run the enosfs command as a user would (python -m enosfs ...)."""
    return run(sys.executable, "-m", "enosfs", *args, **kw)


def background_mount(
    cfg: Path, mnt: Path, emu: Emulator
) -> tuple[subprocess.CompletedProcess[str], int | None]:
    """`enosfs mount` without -f, as a user runs it: its answer and the daemon's pid."""
    out = enosfs("mount", "--config", cfg, mnt, env=secret_env(emu.app_secret))
    pid = int(out.stdout.split("(pid ")[1].split(")")[0]) if "(pid " in out.stdout else None
    return out, pid


# Files EnOS keeps, and files kept in object storage: both are listed.
FILE_SCHEMES = ("enos-connect://", "enos-lark://")


def demo_files(emu: Emulator) -> dict[str, str]:
    """Relative path under the org folder -> fileUri, from the emulator's state."""
    from enosfs.naming import feature_file_name, firmware_file_name

    state = emu.state()
    org = next(o for o in state["orgs"] if o["org_id"] == emu.org)
    out: dict[str, str] = {}
    for d in org["devices"]:
        for ident, value in d["attributes"].items():
            if isinstance(value, str) and value.startswith(FILE_SCHEMES):
                out[f"{d['asset_id']}/feature/{feature_file_name(ident, value)}"] = value
        for ident, (_, value) in d["measurepoints"].items():
            if isinstance(value, str) and value.startswith(FILE_SCHEMES):
                out[f"{d['asset_id']}/feature/{feature_file_name(ident, value)}"] = value
        for fw in org["firmwares"]:
            if fw["product_key"] == d["product_key"]:
                name = firmware_file_name(fw["name"], fw["version"], fw["file_uri"])
                out[f"{d['asset_id']}/ota/{name}"] = fw["file_uri"]
    return out


def free_port() -> int:
    """A loopback port nobody listens on (for an unreachable server, or a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """condition()'s first truthy value, asked every 50 ms; the test fails if none comes
    within timeout seconds. For state another process reaches in its own time (a write
    in the background, a process ending): a fixed sleep is too short on a busy machine
    and too long on an idle one."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what} after {timeout:g}s")
        time.sleep(0.05)
    return value


def known(path: Path) -> os.stat_result:
    """path's size known to the mount as `ls -l` learns it, a listing of its folder and
    then its stat, with nothing of it downloaded yet: a stat by name alone also asks
    for the file's first bytes, which a later read would take (firstbytes.py)."""
    os.listdir(path.parent)
    return path.stat()


def stats_of(mountpoint: Path) -> dict[str, Any]:
    """The mount's /.enosfs/stats."""
    return dict(json.loads((mountpoint / ".enosfs" / "stats").read_bytes()))


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def tmpfs_at(where: Path, size: str = "1m") -> Iterator[Path]:
    """A small tmpfs of our own (needs root), unmounted after: a disk that is really
    nearly full, or a mount that is not FUSE."""
    where.mkdir(exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "enosfs-test", str(where)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False, capture_output=True, timeout=30)
