"""Running a mount: checks first, then the token task, the cache and the FUSE loop.

Everything that can be wrong is checked before the kernel sees a mount (the mountpoint,
the credentials, the organisations), so a mistake costs one clear line, never a
half-working folder. Signals unmount cleanly. Background tasks live in one nursery
around pyfuse3.main(), as S3QL does.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import signal
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyfuse3
import trio

from enosfs import __version__, heap
from enosfs.api import DEVICE_PAGE, Device, EnosClient
from enosfs.auth import TokenSource
from enosfs.blocks import BlockCache
from enosfs.changes import Changes
from enosfs.config import Settings
from enosfs.control import CONTROL_FILE, ControlServer
from enosfs.diskcache import DiskCache
from enosfs.errors import (
    ConfigError,
    Denied,
    EnosfsError,
    InvalidArgument,
    NotFound,
    TransportError,
)
from enosfs.firstbytes import MOST as MOST_FIRST_BYTES
from enosfs.fs import EnosFS
from enosfs.metastore import MetaStore
from enosfs.metrics import serve as serve_metrics
from enosfs.namespace import Namespace
from enosfs.proxies import Proxies
from enosfs.retry import RetryPolicy, retrying
from enosfs.stats import Parts, render_config, render_stats, render_version, snapshot
from enosfs.throttle import START
from enosfs.transport import KEPT_FOR_NOW, LeanTransport, origin_of

log = logging.getLogger(__name__)

FUSE_DEVICE = "/dev/fuse"
# Idle connections opened to each API host at mount: a file's size and its first bytes,
# or the first round of a folder's sizes (the API bound starts at START calls) go at
# once and find one each, beside those calls made ahead leave to awaited ones.
WARM_CONNECTIONS = START + KEPT_FOR_NOW
# Seconds the mount waits at start for the thing models of its devices (see _start).
MODELS_WAIT = 2.0


@dataclass(frozen=True)
class MountEntry:
    """What /proc/self/mountinfo says is mounted at a path (the topmost mount)."""

    device: str  # major:minor, the name of its bdi in /sys/class/bdi
    fstype: str

    @property
    def is_fuse(self) -> bool:
        return self.fstype.startswith("fuse")


def _canonical(path: str) -> str:
    """The path as mountinfo spells it, without touching the last component (a dead
    FUSE mount answers nothing but ENOTCONN)."""
    p = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def mount_entry(path: str) -> MountEntry | None:
    found = None
    target = _canonical(path)
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 7 or _unescape_mountinfo(fields[4]) != target:
                continue
            with contextlib.suppress(ValueError, IndexError):
                fstype = fields[fields.index("-", 6) + 1]
                found = MountEntry(fields[2], fstype)  # later lines are mounted on top
    return found


def fuse_is_dead(path: str, wait: float = 5.0) -> bool:
    """Has this FUSE mount lost its process? Asked with statvfs, which the kernel never
    answers from its caches (stat can, for attr_timeout after the death). A daemon that
    is alive but does not answer within `wait` counts as alive."""
    result: list[BaseException | None] = []

    def ask() -> None:
        try:
            os.statvfs(path)
            result.append(None)
        except OSError as exc:
            result.append(exc)

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(wait)
    return bool(result) and isinstance(result[0], OSError) and result[0].errno == errno.ENOTCONN


def _clean_dead_mount(p: str) -> None:
    try:
        unmount(p, lazy=True)
    except EnosfsError as err:
        raise ConfigError(
            f"mountpoint {p} is a dead FUSE mount (transport endpoint is not connected) "
            f"and cleaning it failed: {err}"
        ) from None
    print(
        f"enosfs: {p} was a dead FUSE mount (its process had died); cleaned it up",
        file=sys.stderr,
    )


def check_mountpoint(path: str, *, allow_nonempty: bool = False, _cleaned: bool = False) -> str:
    """The absolute mountpoint, or a ConfigError saying what is wrong with it.

    A dead FUSE mount (its process died: "transport endpoint is not connected") is
    cleaned up here, with a word to say so, rather than refused; dead is judged
    without trusting stat, which the kernel answers from cached attributes for a while
    after the process died.
    """
    p = os.path.abspath(path)
    entry = mount_entry(p)
    if not _cleaned and entry is not None and entry.is_fuse and fuse_is_dead(p):
        _clean_dead_mount(p)
        return check_mountpoint(p, allow_nonempty=allow_nonempty, _cleaned=True)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ConfigError(f"mountpoint {p} does not exist (create it with: mkdir -p {p})") from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN or _cleaned:
            raise ConfigError(f"mountpoint {p}: {exc.strerror}") from None
        _clean_dead_mount(p)
        return check_mountpoint(p, allow_nonempty=allow_nonempty, _cleaned=True)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"mountpoint {p} is not a directory")
    if entry is not None or os.path.ismount(p):
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
    """The client for EnOS's JSON APIs, on the lean transport (the mount's own, or a new
    one): API calls and file bodies take one path, with the same proxy and the same
    certificate checks. httpx ignores proxy variables for a client given a transport."""
    transport = lean if lean is not None else lean_transport(settings)
    return httpx.AsyncClient(transport=transport, headers={"User-Agent": "enosfs"})


def lean_transport(settings: Settings) -> LeanTransport:
    """The transport of every request, with the proxies the environment names
    (proxies.py); a proxy variable enosfs cannot use stops the mount (ConfigError)."""
    proxies = Proxies.from_environ(os.environ)
    for scheme, proxy in (("http", proxies.http), ("https", proxies.https)):
        if proxy is not None:
            log.info("%s requests go through the proxy %s", scheme, proxy.shown)
    return LeanTransport(
        verify=settings.ca_bundle or True,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.timeout,
        max_connections=settings.max_connections,
        proxies=proxies,
    )


async def check_orgs(client: EnosClient, settings: Settings) -> dict[str, list[Device]]:
    """Unknown organisations are configuration mistakes: say so before mounting.

    Returns the devices of each organisation whose first page of device search held
    them all: its first listing needs no search of its own then (a round trip less
    before the first file far away)."""
    whole: dict[str, list[Device]] = {}
    for org in settings.orgs:
        if not org.discover:
            continue
        try:
            devices, total = await client.search_devices_page(org.org_id, 1)
            if total is None or len(devices) < DEVICE_PAGE or total <= len(devices):
                whole[org.org_id] = list({d.asset_id: d for d in devices}.values())
        except (InvalidArgument, NotFound) as exc:
            raise ConfigError(f"organisation {org.org_id}: {exc.msg}") from None
        except Denied as exc:
            log.warning(
                "organisation %s: device search denied (%s); showing configured "
                "assets and files only",
                org.org_id,
                exc.msg,
            )
    return whole


def is_loopback_host(host: str) -> bool:
    """Is this host this machine, by its name alone? (No lookup: a name that resolves
    to loopback here may not elsewhere, and the question is about the URL.)"""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def warn_plain_http(settings: Settings) -> None:
    """Say once if the access token will cross a network in clear (plain http:// to a
    host that is not this machine)."""
    hosts = sorted(
        {
            url.host
            for url in (httpx.URL(settings.gateway), httpx.URL(settings.integration))
            if url.scheme == "http" and not is_loopback_host(url.host)
        }
    )
    if hosts:
        log.warning(
            "plain http:// to %s: the access token and the files travel unencrypted (use https://)",
            ", ".join(hosts),
        )


async def check_integration(
    http: httpx.AsyncClient, settings: Settings, policy: RetryPolicy
) -> None:
    """Reach the integration host (files live there) before mounting, as the token
    request reaches the gateway: a bad certificate or a wrong address there would
    otherwise give a mount that answers every read with EIO. Any HTTP answer will do."""
    gateway, integration = httpx.URL(settings.gateway), httpx.URL(settings.integration)
    if (gateway.scheme, gateway.host, gateway.port) == (
        integration.scheme,
        integration.host,
        integration.port,
    ):
        return  # the token request has just reached it
    url = f"{settings.integration.rstrip('/')}/connect-service/v2.1/files"

    async def attempt() -> None:
        resp = await http.get(url, params={"action": "getFileInfo"})
        await resp.aclose()

    try:
        await retrying(policy, f"integration host {settings.integration}", attempt)
    except TransportError as exc:
        raise ConfigError(str(exc)) from None


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def set_kernel_read_ahead(mountpoint: str, size: int) -> int | None:
    """Let the kernel read ahead `size` bytes on this mount (as gcsfuse does); return
    the read-ahead the kernel really has, in KiB (None: unknown). 0 leaves it alone.

    The kernel's default of 128 KiB makes it send 128 KiB reads one or two at a time;
    a larger window makes it send 1 MiB reads several at a time, which is what lets a
    sequential reader run at the speed of the network. Call it only once the FUSE INIT
    handshake is done: INIT lowers the bdi's read-ahead to what the daemon offered.
    Needs root (the bdi files in /sys are root's); elsewhere the default stays and this
    says so in the log.
    """
    entry = mount_entry(mountpoint)
    if entry is None:
        log.debug("read-ahead: %s not found in mountinfo", mountpoint)
        return None
    bdi = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
    if size:
        try:
            bdi.write_text(str(size // 1024))
        except OSError as exc:
            log.info("kernel read-ahead left at its default (%s)", exc.strerror)
    try:
        now = int(bdi.read_text())
    except (OSError, ValueError):
        return None
    if size and now != size // 1024:
        log.info("kernel read-ahead is %d KiB, not the %d KiB asked for", now, size // 1024)
    else:
        log.debug("kernel read-ahead is %d KiB", now)
    return now


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

    def __init__(
        self,
        settings: Settings,
        mountpoint: str,
        metrics_addr: tuple[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.mountpoint = mountpoint
        self.metrics_addr = metrics_addr
        self.parts = Parts(settings, mountpoint)
        self._terminated = False

    async def _start(
        self,
        client: EnosClient,
        tokens: TokenSource,
        lean: LeanTransport,
        ns: Namespace,
        http: httpx.AsyncClient,
        policy: RetryPolicy,
    ) -> None:
        """Token, organisations, and the thing models their devices use, in series (each
        needs the one before), while idle connections open in the background: far from
        EnOS, the first file a user opens then pays for no connection, nor for a model
        its folder's listing would wait for. Whether the server has getFileInfo is
        learnt beside the models (catalog.learn_sizing). They get MODELS_WAIT at most;
        what is not back by then is left to the listings that need it."""
        s = self.settings
        for origin in dict.fromkeys([s.gateway, s.integration]):
            lean.open_ahead(origin_of(httpx.URL(origin)), WARM_CONNECTIONS)
        await tokens.start()
        await check_integration(http, s, policy)
        searched = await check_orgs(client, s)
        for org_id, devices in searched.items():
            ns.catalog.offer_devices(org_id, devices)
        with trio.move_on_after(MODELS_WAIT):
            async with trio.open_nursery() as models:
                for org_id, devices in searched.items():
                    ids = [d.asset_id for d in devices]
                    models.start_soon(ns.catalog.models_ahead, org_id, ids)
                    models.start_soon(ns.catalog.learn_sizing, org_id, devices)

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        s = self.settings
        p = self.parts
        policy = RetryPolicy(timeout=s.timeout, max_attempts=s.retries + 1)
        lean = p.lean = lean_transport(s)
        warn_plain_http(s)
        async with contextlib.AsyncExitStack() as stack:
            store: MetaStore | None = None
            if s.cache_dir is not None:
                disk = DiskCache(Path(s.cache_dir), s.disk_size, s.min_free)
                await trio.to_thread.run_sync(disk.open)
                stack.callback(disk.close)
                p.disk = disk
                # Listings and sizes for the next mount; None where it cannot be kept.
                store = await MetaStore.open(Path(s.cache_dir))
                if store is not None:
                    stack.push_async_callback(store.close)  # a start that fails, too
            http = await stack.enter_async_context(http_client(s, lean))
            p.tokens = TokenSource(
                http,
                s.gateway,
                s.app_key,
                s.app_secret,
                refresh_margin=s.token_refresh_margin,
                policy=policy,
                secret_file=s.app_secret_file,
            )
            p.client = EnosClient(
                http,
                p.tokens,
                gateway=s.gateway,
                integration=s.integration,
                policy=policy,
                lean=lean,
                max_api_concurrency=s.max_api_concurrency,
            )
            ns = Namespace(p.client, s)
            await self._start(p.client, p.tokens, lean, ns, http, policy)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(p.tokens.run)
                if s.first_bytes > 0:  # sent at lookup (firstbytes.py)
                    p.client.first_bytes.size = s.first_bytes
                    # Held bodies keep a connection each: a quarter of the pool at most.
                    p.client.first_bytes.most = min(MOST_FIRST_BYTES, s.max_connections // 4)
                    p.client.first_bytes.nursery = nursery
                p.cache = BlockCache(
                    p.client,
                    nursery,
                    block_size=s.block_size,
                    budget=s.cache_memory,
                    disk=p.disk,
                    min_speed=s.min_speed,
                    speed_time=s.speed_time,
                )
                # Downloads and listings report changes here; it drops what they void.
                changes = Changes(nursery)
                # Listings and sizing batches outlive a caller that gives up at its deadline.
                ns.nursery = nursery
                if store is not None:
                    ns.catalog.store = store
                    nursery.start_soon(store.run)
                changes.attach(p.cache, ns)
                p.store, p.changes = store, changes
                # `enosfs refresh` reaches the namespace through this (control.py).
                control = ControlServer(ns, changes)
                await control.open()
                stack.callback(control.close)
                ns.add_control(
                    {
                        "stats": lambda: render_stats(p),
                        "config": lambda: render_config(s),
                        "version": render_version,
                        CONTROL_FILE: control.advert,
                    }
                )
                p.fs = EnosFS(ns, p.cache, s, changes, p.client.first_bytes)
                if self.metrics_addr is not None:
                    token = trio.lowlevel.current_trio_token()
                    serve_metrics(
                        self.metrics_addr,
                        lambda: trio.from_thread.run_sync(snapshot, p, trio_token=token),
                    )
                pyfuse3.init(p.fs, self.mountpoint, mount_options(s))
                unmount = True
                try:
                    nursery.start_soon(self._signals)
                    nursery.start_soon(self._kernel_read_ahead)
                    nursery.start_soon(control.serve)
                    log.info("%s", self.summary())
                    if ready is not None:
                        ready()
                    await pyfuse3.main(min_tasks=4, max_tasks=64)
                    # main() returns on our terminate() or when someone else unmounted.
                    unmount = self._terminated
                finally:
                    pyfuse3.close(unmount=unmount)
                    if p.disk is not None:
                        # Blocks read just before the unmount are kept for the next
                        # mount; the fetches still running are cancelled below.
                        await p.disk.drain()
                    if store is not None:
                        await store.close()
                    log.info(
                        "unmounted %s; %s", self.mountpoint, json.dumps(snapshot(p), default=str)
                    )
                    nursery.cancel_scope.cancel()

    def summary(self) -> str:
        """The one start-up line: what is mounted where, from what, with what caches."""
        s, p = self.settings, self.parts
        disk = (
            f"disk cache {s.cache_dir} ({s.disk_size >> 20} MiB)"
            if s.cache_dir
            else "no disk cache"
        )
        left = p.tokens.expires_in if p.tokens is not None else None
        token = f"token expires in {left:.0f}s" if left is not None else "no token"
        metrics = (
            f"; metrics on {self.metrics_addr[0]}:{self.metrics_addr[1]}"
            if self.metrics_addr
            else ""
        )
        return (
            f"enosfs {__version__} mounted {', '.join(o.org_id for o in s.orgs)} at "
            f"{self.mountpoint} from {s.gateway}; memory cache {s.cache_memory >> 20} MiB, "
            f"{disk}; {token}{metrics}"
        )

    async def _kernel_read_ahead(self) -> None:
        """Set the kernel's read-ahead once the INIT handshake is over (it resets it).

        The kernel holds every request until INIT is answered, so our own statvfs
        coming back (served by the loop this task runs beside) means INIT is done.
        """
        with trio.move_on_after(60), contextlib.suppress(OSError):
            await trio.to_thread.run_sync(os.statvfs, self.mountpoint, abandon_on_cancel=True)
        self.parts.read_ahead_kb = await trio.to_thread.run_sync(
            set_kernel_read_ahead, self.mountpoint, self.settings.kernel_read_ahead
        )

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s received: unmounting", signal.Signals(signum).name)
                self._terminated = True
                pyfuse3.terminate()
                return


def run_foreground(
    settings: Settings,
    mountpoint: str,
    ready: Callable[[], None] | None = None,
    *,
    metrics_addr: tuple[str, int] | None = None,
) -> None:
    """Mount and serve until unmounted or signalled. Raises EnosfsError for the CLI."""
    check_fuse()
    heap.tune()
    trio.run(Mount(settings, mountpoint, metrics_addr).run, ready)


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """Unmount a FUSE mount, ours or another process's, live or dead; refuse anything
    else (as root, umount would take down whatever is there)."""
    import shutil
    import subprocess

    p = os.path.abspath(mountpoint)
    entry = mount_entry(p)
    if entry is None:
        if not os.path.lexists(p):
            raise EnosfsError(f"{p} does not exist")
        raise EnosfsError(f"{p} is not a mountpoint")
    if not entry.is_fuse:
        raise EnosfsError(
            f"{p} is not a FUSE mount (it is {entry.fstype}); enosfs umount only unmounts FUSE"
        )
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
