"""Running a mount: checks first, then the token task, the cache and the FUSE loop.

Everything that can be wrong is checked before the kernel sees a mount (the mountpoint,
the credentials, the organisations), so a mistake costs one clear line, never a
half-working folder. Signals unmount cleanly. Background tasks live in one nursery
around pyfuse3.main(), as S3QL does.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pyfuse3
import trio

from enosfs.api import EnosClient
from enosfs.auth import TokenSource
from enosfs.blocks import BlockCache, CachedFile
from enosfs.config import Settings
from enosfs.errors import ConfigError, Denied, EnosfsError, InvalidArgument, NotFound
from enosfs.fs import EnosFS
from enosfs.namespace import Dir, File, Namespace
from enosfs.retry import RetryPolicy
from enosfs.transport import LeanTransport

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"


def check_mountpoint(path: str, *, allow_nonempty: bool = False) -> str:
    """The absolute mountpoint, or a ConfigError saying what is wrong with it."""
    p = os.path.abspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ConfigError(f"mountpoint {p} does not exist (create it with: mkdir -p {p})") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise ConfigError(
                f"mountpoint {p} is a dead FUSE mount (transport endpoint is not connected); "
                f"clean it with: enosfs umount {p}"
            ) from None
        raise ConfigError(f"mountpoint {p}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"mountpoint {p} is not a directory")
    if os.path.ismount(p):
        raise ConfigError(f"{p} is already a mountpoint (unmount it first: enosfs umount {p})")
    if not allow_nonempty and any(os.scandir(p)):
        raise ConfigError(
            f"mountpoint {p} is not empty; its files would be hidden (use --allow-nonempty)"
        )
    if not os.access(p, os.W_OK | os.X_OK) and os.getuid() != 0:
        raise ConfigError(f"mountpoint {p} is not writable by you; FUSE needs that to mount")
    return p


def check_fuse() -> None:
    if not os.path.exists(FUSE_DEVICE):
        raise ConfigError(
            f"{FUSE_DEVICE} is missing: FUSE is not available (modprobe fuse; apt install fuse3)"
        )


def http_client(settings: Settings, lean: LeanTransport | None = None) -> httpx.AsyncClient:
    """The client for EnOS's JSON APIs: on the lean transport where there is one."""
    if lean is not None:
        return httpx.AsyncClient(transport=lean, headers={"User-Agent": "enosfs"})
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
        keepalive_expiry=30,
    )
    timeout = httpx.Timeout(settings.timeout, connect=settings.connect_timeout)
    return httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        verify=settings.ca_bundle or True,
        headers={"User-Agent": "enosfs"},
    )


def lean_transport(settings: Settings) -> LeanTransport | None:
    """The lean transport for file bodies; None where a proxy is configured (it speaks
    only direct HTTP/1.1, and httpx's own transport does proxies)."""
    proxy_vars = ("http_proxy", "https_proxy", "all_proxy")
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in proxy_vars):
        log.info("a proxy is configured: file downloads use httpx's own transport")
        return None
    return LeanTransport(
        verify=settings.ca_bundle or True,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.timeout,
        max_connections=settings.max_connections,
    )


async def check_orgs(client: EnosClient, settings: Settings) -> None:
    """Unknown organisations are configuration mistakes: say so before mounting."""
    for org in settings.orgs:
        if not org.discover:
            continue
        try:
            await client.search_devices_page(org.org_id, 1)
        except (InvalidArgument, NotFound) as exc:
            raise ConfigError(f"organisation {org.org_id}: {exc.msg}") from None
        except Denied as exc:
            log.warning(
                "organisation %s: device search denied (%s); showing configured "
                "assets and files only",
                org.org_id,
                exc.msg,
            )


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def set_kernel_read_ahead(mountpoint: str, size: int) -> bool:
    """Let the kernel read ahead `size` bytes on this mount (as gcsfuse does).

    The kernel's default of 128 KiB makes it send 128 KiB reads one or two at a time;
    a larger window makes it send 1 MiB reads several at a time, which is what lets a
    sequential reader run at the speed of the network. Needs root (the bdi files in
    /sys are root's); elsewhere the default stays and this says so in the log.
    """
    device = None
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and _unescape_mountinfo(fields[4]) == mountpoint:
                device = fields[2]
    if device is None:
        log.debug("read-ahead: %s not found in mountinfo", mountpoint)
        return False
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(size // 1024))
    except OSError as exc:
        log.info("kernel read-ahead left at its default (%s)", exc.strerror)
        return False
    log.debug("kernel read-ahead set to %d KiB", size // 1024)
    return True


def mount_options(settings: Settings) -> set[str]:
    host = httpx.URL(settings.integration).host
    opts = {
        "ro",
        "default_permissions",
        "nodev",
        "nosuid",
        "noatime",
        f"fsname=enosfs:{host}",
        "subtype=enosfs",
    }
    if settings.allow_other:
        opts.add("allow_other")
    return opts


class Mount:
    """One mounted filesystem and the tasks that serve it."""

    def __init__(self, settings: Settings, mountpoint: str) -> None:
        self.settings = settings
        self.mountpoint = mountpoint
        self.fs: EnosFS | None = None
        self.cache: BlockCache | None = None
        self.tokens: TokenSource | None = None
        self.client: EnosClient | None = None
        self._terminated = False

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        policy = RetryPolicy(timeout=s.timeout, max_attempts=s.retries + 1)
        lean = lean_transport(s)
        async with http_client(s, lean) as http:
            self.tokens = TokenSource(
                http,
                s.gateway,
                s.app_key,
                s.app_secret,
                refresh_margin=s.token_refresh_margin,
                policy=policy,
            )
            await self.tokens.start()
            self.client = EnosClient(
                http,
                self.tokens,
                gateway=s.gateway,
                integration=s.integration,
                policy=policy,
                lean=lean,
            )
            await check_orgs(self.client, s)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.tokens.run)
                self.cache = BlockCache(
                    self.client, nursery, block_size=s.block_size, budget=s.cache_memory
                )
                ns = Namespace(
                    self.client,
                    s,
                    on_version_change=lambda f, old: self._changed(nursery, f, old),
                    on_entry_change=self._entry_changed,
                )
                self.cache.on_changed = ns.expire
                self.fs = EnosFS(ns, self.cache, s)
                pyfuse3.init(self.fs, self.mountpoint, mount_options(s))
                if s.kernel_read_ahead:
                    set_kernel_read_ahead(self.mountpoint, s.kernel_read_ahead)
                unmount = True
                try:
                    nursery.start_soon(self._signals)
                    log.info(
                        "mounted %s at %s", ", ".join(o.org_id for o in s.orgs), self.mountpoint
                    )
                    if ready is not None:
                        ready()
                    await pyfuse3.main(min_tasks=4, max_tasks=64)
                    # main() returns on our terminate() or when someone else unmounted.
                    unmount = self._terminated
                finally:
                    pyfuse3.close(unmount=unmount)
                    log.info(
                        "unmounted %s (kernel reads %s, cache %s, requests %s, connections %s,"
                        " retries %d)",
                        self.mountpoint,
                        dict(self.fs.stats),
                        dict(self.cache.stats),
                        dict(self.client.requests),
                        lean.connects if lean else "-",
                        self.client.retries,
                    )
                    nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s received: unmounting", signal.Signals(signum).name)
                self._terminated = True
                pyfuse3.terminate()
                return

    def _entry_changed(self, d: Dir, name: str) -> None:
        """Have the kernel drop a name whose file changed or went away (in a thread of
        pyfuse3's: invalidating from inside a request could deadlock)."""
        with contextlib.suppress(OSError, RuntimeError):
            pyfuse3.invalidate_entry_async(d.inode, name.encode(), ignore_enoent=True)

    def _changed(self, nursery: trio.Nursery, f: File, old: object) -> None:
        """A file's content changed on the server: drop what we and the kernel hold."""
        from enosfs.api import FileMeta

        if self.cache is not None and isinstance(old, FileMeta) and old.size is not None:
            self.cache.drop(CachedFile(f.ref, old.size, old.version))

        async def invalidate() -> None:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, f.inode)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOSYS):
                    log.debug("invalidate %s: %s", f.path, exc)

        nursery.start_soon(invalidate)


def run_foreground(
    settings: Settings, mountpoint: str, ready: Callable[[], None] | None = None
) -> None:
    """Mount and serve until unmounted or signalled. Raises EnosfsError for the CLI."""
    check_fuse()
    trio.run(Mount(settings, mountpoint).run, ready)


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount a FUSE mount, ours or another process's, live or dead."""
    import shutil
    import subprocess

    p = os.path.abspath(mountpoint)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        cmd = [tool, "-u"] + (["-z"] if lazy else []) + [p]
    elif os.getuid() == 0 and shutil.which("umount"):
        cmd = ["umount"] + (["-l"] if lazy else []) + [p]
    else:
        raise EnosfsError("neither fusermount3 nor umount is available")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        msg = detail[-1] if detail else f"exit {result.returncode}"
        if not Path(p).exists():
            raise EnosfsError(f"{p} does not exist")
        raise EnosfsError(f"cannot unmount {p}: {msg}")
