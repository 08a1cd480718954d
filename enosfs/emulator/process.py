"""The emulator and a mount, each in a child process, as the demo, the tests, the
benchmark and the soak start them.

One way to start, watch and end them, here rather than in tests/ or scripts/, so that
each of those imports it (without pytest) instead of keeping a copy of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx

from enosfs.config import SECRET_ENV
from enosfs.errors import EnosfsError
from enosfs.signature import token_signature

START_TIMEOUT = 180.0  # the first demo run builds its data before serving
MOUNT_TIMEOUT = 60.0


class MountFailed(EnosfsError):
    """A mount started here ended, or did not show up, before the kernel listed it."""


def start_emulator(
    data_dir: Path,
    seed: str = "demo",
    extra: Sequence[str] = (),
    *,
    network: str | None = None,
    rate_limit: str | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `enosfs emulator` on a free loopback port; return its process and URL.

    seed may be a generated organisation ("generate:devices=5000,..."); network
    ("rtt=40ms,conn=25MB/s,...") and rate_limit ("50/s") play a distant, rate-limited
    gateway (both can also be changed at run time: POST /__emulator__/network)."""
    if network:
        extra = [*extra, "--network", network]
    if rate_limit:
        extra = [*extra, "--rate-limit", rate_limit]
    tmp = Path(tempfile.mkdtemp(prefix="enosfs-emulator-"))
    ready = tmp / "ready.json"
    cmd = [
        sys.executable,
        "-m",
        "enosfs",
        "emulator",
        "--seed",
        seed,
        "--data-dir",
        str(data_dir),
        "--port",
        "0",
        "--ready-file",
        str(ready),
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                raise EnosfsError(f"the emulator exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                stop_process(proc)
                raise EnosfsError("the emulator did not start in time")
            time.sleep(0.05)
        return proc, json.loads(ready.read_text())["url"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there ten seconds later."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def tinyproxy(
    work: Path, *, basic_auth: tuple[str, str] | None = None, timeout: int = 120
) -> Iterator[tuple[int, Path]]:
    """tinyproxy from the distribution on a free loopback port, its config and log in
    work: (its port, its log, where each request it forwarded is a `Request (...)` line).
    With basic_auth (user, password) it asks for them. Ended by its PID."""
    exe = shutil.which("tinyproxy")
    if exe is None:
        raise EnosfsError("tinyproxy is missing (scripts/test and scripts/bench install it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log, conf = work / "tinyproxy.log", work / "tinyproxy.conf"
    auth = f"BasicAuth {basic_auth[0]} {basic_auth[1]}\n" if basic_auth else ""
    conf.write_text(
        f"Port {port}\nListen 127.0.0.1\nTimeout {timeout}\nMaxClients 64\n"
        f'LogLevel Connect\nLogFile "{log}"\n{auth}'
    )
    proc = subprocess.Popen(
        [exe, "-d", "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise EnosfsError("tinyproxy did not start")
            time.sleep(0.05)
        yield port, log
    finally:
        stop_process(proc)


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether the kernel lists a mount at path. Read from /proc/mounts rather than
    asked with stat(), which a hung mount would answer never."""
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(_unescape(line.split()[1]) == target for line in f)


def _unescape(field: str) -> str:
    """/proc/mounts writes a space, tab, newline or backslash in a path as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_in_background(
    config: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    secret: str,
    *args: str,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """`enosfs mount -f --config CONFIG ARGS MOUNTPOINT` in a child process, with the
    secret in its environment as a user would set it; wait_mounted() tells when it is up."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "enosfs",
            "mount",
            "-f",
            "--config",
            str(config),
            *args,
            str(mountpoint),
        ],
        env={**os.environ, SECRET_ENV: secret},
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
    )


def wait_mounted(
    path: str | os.PathLike[str],
    proc: subprocess.Popen[bytes],
    timeout: float = MOUNT_TIMEOUT,
) -> None:
    """Return once the kernel shows the mount at path; MountFailed if the process ends
    first (with what it wrote to a piped stderr) or the time runs out."""
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise MountFailed(f"mount exited {proc.returncode}: {err}")
        if time.monotonic() > deadline:
            raise MountFailed("mount did not appear in time")
        time.sleep(0.02)


def unmount_and_wait(
    path: str | os.PathLike[str], proc: subprocess.Popen[bytes], timeout: float = 60.0
) -> None:
    """Unmount (if mounted) and wait for the mount process to end, killing it if it
    outstays the timeout."""
    if is_mounted(path):
        subprocess.run(
            ["fusermount3", "-u", str(path)], check=False, capture_output=True, timeout=timeout
        )
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def plain_token(client: httpx.Client, url: str, app_key: str, app_secret: str) -> str:
    """An access token asked for as any plain client would: what the bench's reference
    requests carry."""
    ts = int(time.time() * 1000)
    r = client.post(
        f"{url}/apim-token-service/v2.0/token/get",
        json={
            "appKey": app_key,
            "timestamp": ts,
            "encryption": token_signature(app_key, ts, app_secret),
        },
        timeout=30,
    )
    r.raise_for_status()
    return str(r.json()["data"]["accessToken"])
