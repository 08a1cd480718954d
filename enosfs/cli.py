"""The `enosfs` command: mount, umount, stats, verify, refresh, warm, emulator, demo.

Errors a user can cause end as one line on stderr and a non-zero exit, never as a
traceback. Secrets are never taken from the command line, where `ps` would show them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from enosfs import __version__
from enosfs.config import (
    SECRET_ENV,
    ConfigError,
    Settings,
    load_settings,
    parse_size,
    validated,
)
from enosfs.emulator.process import start_emulator, stop_process
from enosfs.errors import EnosfsError
from enosfs.options import describe_options
from enosfs.settings_schema import BY_FIELD

log = logging.getLogger("enosfs")

LOG_LEVELS = ["debug", "info", "warning", "error"]
EXIT_ERROR = 1
EXIT_USAGE = 2  # a path that is not where the command can act, as argparse's own errors
WARM_JOBS = 8
READY_TIMEOUT = 180.0


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, log_file: str | None = None, fmt: str = "text") -> None:
    try:
        handler: logging.Handler = (
            logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
        )
    except OSError as exc:
        raise ConfigError(f"cannot write the log file {log_file}: {exc.strerror}") from None
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: far too loud for a filesystem.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def leaf_error(exc: BaseException) -> BaseException:
    """The error worth reporting inside (possibly nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = leaf_error(inner)
            if isinstance(found, EnosfsError):
                return found
        return leaf_error(exc.exceptions[0])
    return exc


def describe(exc: BaseException) -> str | None:
    """One line for an error a user can act on; None for a bug."""
    exc = leaf_error(exc)
    if isinstance(exc, EnosfsError):
        return str(exc)
    if isinstance(exc, RuntimeError) and "fuse_session" in str(exc):
        return "the kernel refused the mount (is FUSE usable here? see the log for details)"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}"
    return None


# -- mount ------------------------------------------------------------------------------


@dataclass
class MountRequest:
    """Everything `enosfs mount` was asked, checked: the settings and how to run."""

    settings: Settings
    mountpoint: str
    log_level: str
    log_file: str | None
    log_format: str
    metrics_addr: tuple[str, int] | None


def resolve_mount(args: argparse.Namespace, env: dict[str, str] | None = None) -> MountRequest:
    """Configuration file, then -o options, then flags: each overrides the one before."""
    from enosfs.options import parse_options

    opts = parse_options(args.options or [])
    config = args.config or opts.command.get("config")
    if not config:
        raise ConfigError("give the configuration file: --config FILE (or -o config=FILE)")
    settings = opts.apply(load_settings(config, env))
    extra: dict[str, Any] = {}
    if args.cache_dir:
        extra["cache_dir"] = os.path.abspath(args.cache_dir)
    if args.cache_size:
        extra["disk_size"] = parse_size(args.cache_size, "--cache-size")
    if extra:
        settings = validated(replace(settings, **extra))
    if settings.cache_dir is None and args.cache_size:
        raise ConfigError("--cache-size needs a --cache-dir")
    level = args.log_level or opts.command.get("log_level") or "info"
    fmt = args.log_format or opts.command.get("log_format") or "text"
    if level not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    if fmt not in ("text", "json"):
        raise ConfigError("log format must be text or json")
    metrics = args.metrics_addr or opts.command.get("metrics_addr")
    return MountRequest(
        settings=settings,
        mountpoint=args.mountpoint,
        log_level=level,
        log_file=args.log_file or opts.command.get("log_file"),
        log_format=fmt,
        metrics_addr=parse_addr(metrics) if metrics else None,
    )


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--metrics-addr must be HOST:PORT, not {text!r}")
    return (host.strip("[]") or "127.0.0.1", int(port))


SECRET_MAX = 4096  # fits a pipe's buffer whatever the pipe limits, so writing never blocks


def secret_pipe(secret: str) -> int:
    """A pipe's read end, inheritable, holding the secret: how a process started from
    here gets it without an environment variable (visible in /proc/PID/environ for the
    process's whole life) or an argument (visible in `ps`)."""
    data = secret.encode()
    if len(data) > SECRET_MAX:
        raise ConfigError(f"the app secret in {SECRET_ENV} is longer than {SECRET_MAX} bytes")
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
    finally:
        os.close(write_fd)
    os.set_inheritable(read_fd, True)
    return read_fd


def read_secret_fd(fd: int) -> str:
    """The secret a parent process handed over with secret_pipe()."""
    chunks: list[bytes] = []
    try:
        with os.fdopen(fd, "rb") as pipe:
            while chunk := pipe.read(SECRET_MAX + 1):
                chunks.append(chunk)
                if sum(map(len, chunks)) > SECRET_MAX:
                    raise ConfigError(f"the secret on --secret-fd is over {SECRET_MAX} bytes")
    except OSError as exc:
        raise ConfigError(f"cannot read the secret from --secret-fd {fd}: {exc.strerror}") from None
    return b"".join(chunks).decode("utf-8", "replace")


def env_without_secret() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != SECRET_ENV}


def reexec_without_secret(args: argparse.Namespace) -> None:
    """Run this foreground mount again, same pid, with the secret on a pipe instead of in
    the environment: a process's own environment block cannot be wiped in place."""
    fd = secret_pipe(os.environ[SECRET_ENV])
    cmd = [sys.executable, "-m", "enosfs", "mount", "--foreground", "--secret-fd", str(fd)]
    if args.ready_fd is not None:
        cmd += ["--ready-fd", str(args.ready_fd)]
    cmd += child_args(args)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, cmd, env_without_secret())
    except OSError as exc:
        why = f"cannot restart the mount without the secret in its environment: {exc.strerror}"
        raise ConfigError(f"{why}; use app_secret_file") from None


def cmd_mount(args: argparse.Namespace) -> int:
    from enosfs.mount import check_fuse, check_mountpoint

    if args.foreground and args.secret_fd is None and os.environ.get(SECRET_ENV):
        reexec_without_secret(args)
    if args.foreground:
        ready_fd = args.ready_fd

        def ready() -> None:
            nonlocal ready_fd
            if ready_fd is not None:
                os.write(ready_fd, b"ok\n")
                os.close(ready_fd)
                ready_fd = None  # the number may soon name another file

        try:
            env: dict[str, str] | None = None
            if args.secret_fd is not None:
                env = {**os.environ, SECRET_ENV: read_secret_fd(args.secret_fd)}
            req = resolve_mount(args, env)
            # Out of this process's environment, which fusermount3 and any other child
            # would inherit (an empty one may still be there).
            os.environ.pop(SECRET_ENV, None)
            setup_logging(req.log_level, req.log_file, req.log_format)
            from enosfs.mount import run_foreground

            mountpoint = check_mountpoint(req.mountpoint, allow_nonempty=args.allow_nonempty)
            check_fuse()
            run_foreground(req.settings, mountpoint, ready, metrics_addr=req.metrics_addr)
            return 0
        except BaseException as exc:
            text = describe(exc)
            if text is None:
                if isinstance(leaf_error(exc), KeyboardInterrupt):
                    return 130
                raise
            if ready_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(ready_fd, (text + "\n").encode())
            if any(isinstance(h, logging.FileHandler) for h in logging.getLogger().handlers):
                log.error("%s", text)
            if ready_fd is None:
                print(f"enosfs: {text}", file=sys.stderr)
            return EXIT_ERROR
    # Check what can be checked here, then let a child process do the mount and wait
    # for its word that the mount is ready (or why it is not).
    req = resolve_mount(args)
    check_mountpoint(req.mountpoint, allow_nonempty=args.allow_nonempty)
    check_fuse()
    # The daemon gets the secret on a pipe, never in its environment (see secret_pipe).
    secret = os.environ.get(SECRET_ENV)
    secret_fd = secret_pipe(secret) if secret else None
    read_fd, write_fd = os.pipe()
    cmd = [
        sys.executable,
        "-m",
        "enosfs",
        "mount",
        "--foreground",
        "--ready-fd",
        str(write_fd),
        *(["--secret-fd", str(secret_fd)] if secret_fd is not None else []),
        *child_args(args),
    ]
    try:
        with open(os.devnull, "r+b") as devnull:
            proc = subprocess.Popen(
                cmd,
                stdin=devnull,
                stdout=devnull,
                stderr=devnull,
                pass_fds=(write_fd,) if secret_fd is None else (write_fd, secret_fd),
                start_new_session=True,
                env=env_without_secret(),
            )
    finally:
        os.close(write_fd)
        if secret_fd is not None:
            os.close(secret_fd)
    answer = _read_answer(read_fd, proc)
    if answer == "ok":
        print(
            f"enosfs: mounted at {os.path.abspath(args.mountpoint)} (pid {proc.pid}); "
            f"unmount with: enosfs umount {args.mountpoint}"
        )
        return 0
    print(f"enosfs: {answer}", file=sys.stderr)
    return EXIT_ERROR


def child_args(args: argparse.Namespace) -> list[str]:
    """The same request for the background process, with paths made absolute."""
    out: list[str] = []
    if args.config:
        out += ["--config", os.path.abspath(args.config)]
    for group in args.options or []:
        out += ["-o", group]
    for flag, value in (
        ("--log-level", args.log_level),
        ("--log-format", args.log_format),
        ("--metrics-addr", args.metrics_addr),
        ("--cache-size", args.cache_size),
    ):
        if value:
            out += [flag, value]
    for flag, path in (("--log-file", args.log_file), ("--cache-dir", args.cache_dir)):
        if path:
            out += [flag, os.path.abspath(path)]
    if args.allow_nonempty:
        out.append("--allow-nonempty")
    return [*out, os.path.abspath(args.mountpoint)]


def _read_answer(fd: int, proc: subprocess.Popen[bytes]) -> str:
    import select

    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 0.5)
            if ready:
                chunk = pipe.read(4096)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"\n"):
                    break
            elif proc.poll() is not None:
                break
        else:
            proc.terminate()
            return f"the mount did not become ready within {READY_TIMEOUT:.0f}s"
    text = data.decode("utf-8", "replace").strip()
    if text:
        return text
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return "the mount process neither mounted nor said why"
    return f"the mount process exited with status {code} before mounting"


def cmd_stats(args: argparse.Namespace) -> int:
    from enosfs.watch import watch

    if args.interval <= 0:
        raise ConfigError("--interval must be above zero")
    return watch(
        args.mountpoint, interval=args.interval, count=args.count, raw=args.json, live=args.watch
    )


def cmd_verify(args: argparse.Namespace) -> int:
    from enosfs.verify import verify

    missing = [p for p in args.paths if not os.path.exists(p)]
    if missing:
        raise ConfigError(f"{missing[0]}: no such file or folder")
    return verify(args.paths)


def cmd_refresh(args: argparse.Namespace) -> int:
    """Ask the mount, over its control socket (control.py), to drop what it holds."""
    from enosfs.control import ask
    from enosfs.locate import NotOnMount, place_of

    try:
        place = place_of(args.path)
    except NotOnMount as exc:
        print(f"enosfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    answer = ask(place.mountpoint, {"op": "refresh", "path": "" if args.all else place.relative})
    if answer.get("missing"):
        print(
            f"enosfs: {args.path} is not known to the mount at {place.mountpoint} "
            "(refresh the folder that holds it)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not answer.get("ok"):
        print(f"enosfs: {place.mountpoint}: {answer.get('error')}", file=sys.stderr)
        return EXIT_ERROR
    where = os.path.join(place.mountpoint, str(answer.get("path", "")).lstrip("/"))
    print(
        f"refreshed {where.rstrip('/')}: {answer.get('folders', 0)} folders and "
        f"{answer.get('files', 0)} files are asked of EnOS again at their next use"
    )
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    from enosfs.locate import NotOnMount, place_of
    from enosfs.warm import warm

    if args.jobs < 1:
        raise ConfigError("--jobs must be at least 1")
    try:
        place = place_of(args.path)
    except NotOnMount as exc:
        print(f"enosfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isdir(place.path):
        print(f"enosfs: {args.path} is not a folder on the mount", file=sys.stderr)
        return EXIT_USAGE
    return warm(place.path, args.path, jobs=args.jobs, at_mount_root=not place.relative)


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """/sbin/mount.fuse.enosfs: what mount(8) runs for `mount -t fuse.enosfs` and fstab.

    mount(8) calls it as `mount.fuse.enosfs CONFIG MOUNTPOINT [-o OPTIONS] [-snfv]`.
    """
    p = argparse.ArgumentParser(prog="mount.fuse.enosfs")
    p.add_argument("config")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    for flag in ("-s", "-n", "-f", "-v"):  # sloppy, no mtab, fake, verbose: mount(8)'s own
        p.add_argument(flag, action="store_true")
    p.add_argument("-t", dest="fstype")
    p.add_argument("-N", dest="namespace")
    h = p.parse_args(argv)
    if h.f:
        return 0
    args = argparse.Namespace(
        mountpoint=h.mountpoint,
        config=h.config,
        options=h.options,
        foreground=False,
        allow_nonempty=False,
        log_level=None,
        log_file=None,
        log_format=None,
        metrics_addr=None,
        cache_dir=None,
        cache_size=None,
        ready_fd=None,
        secret_fd=None,
    )
    try:
        return cmd_mount(args)
    except BaseException as exc:
        text = describe(exc)
        if text is None:
            raise
        print(f"mount.fuse.enosfs: {text}", file=sys.stderr)
        return EXIT_ERROR


def cmd_umount(args: argparse.Namespace) -> int:
    from enosfs.mount import unmount

    unmount(args.mountpoint, lazy=args.lazy)
    return 0


# -- emulator ---------------------------------------------------------------------------


def cmd_emulator(args: argparse.Namespace) -> int:
    try:
        from enosfs.emulator.app import Switches
        from enosfs.emulator.server import EmulatorOptions, serve
    except ImportError as exc:
        raise EnosfsError(
            f"the emulator needs its extra dependencies ({exc.name}): "
            "pip install 'enos-fuse[emulator]'"
        ) from None
    from enosfs.emulator.faults import Fault, FaultError, Faults
    from enosfs.emulator.network import NetworkError, NetworkProfile
    from enosfs.emulator.ratelimit import RateLimit, RateLimitError

    switches = Switches(
        token_lifetime=args.token_lifetime,
        honour_range=not args.no_range,
        file_info=not args.no_file_info,
        token_rejection=args.token_rejection,
        lark_url_lifetime=args.lark_url_lifetime,
    )
    if args.token_lifetime <= 0:
        raise ConfigError("--token-lifetime must be above zero")
    if args.lark_url_lifetime <= 0:
        raise ConfigError("--lark-url-lifetime must be above zero")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    faults = Faults(args.fault_seed)
    try:
        faults.replace([Fault.from_spec(spec) for spec in args.fault])
    except FaultError as exc:
        raise ConfigError(f"--fault: {exc}") from None
    try:
        network = NetworkProfile.from_spec(args.network) if args.network else None
    except NetworkError as exc:
        raise ConfigError(f"--network: {exc}") from None
    try:
        rate_limit = RateLimit.from_spec(args.rate_limit) if args.rate_limit else None
    except RateLimitError as exc:
        raise ConfigError(f"--rate-limit: {exc}") from None
    return serve(
        EmulatorOptions(
            host=args.host,
            port=args.port,
            seed=args.seed,
            data_dir=args.data_dir,
            demo_large_size=parse_size(args.demo_large_size, "--demo-large-size"),
            ready_file=args.ready_file,
            switches=switches,
            faults=faults,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            expose_admin=args.expose_admin,
            network=network,
            rate_limit=rate_limit,
            objectstore_port=args.objectstore_port,
        )
    )


# -- demo -------------------------------------------------------------------------------


def default_demo_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "enosfs" / "demo-data"


def demo_settings(url: str) -> Settings:
    from enosfs.config import settings_from_dict
    from enosfs.emulator.demo import DEMO_APP_KEY, DEMO_APP_SECRET, DEMO_ORG

    return settings_from_dict(
        {"enos": {"gateway": url, "app_key": DEMO_APP_KEY}, "org": [{"id": DEMO_ORG}]},
        {SECRET_ENV: DEMO_APP_SECRET},
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from enosfs.emulator.demo import DEMO_ORG
    from enosfs.mount import check_fuse, check_mountpoint, run_foreground

    setup_logging(args.log_level)
    mp = Path(args.mountpoint)
    mp.mkdir(parents=True, exist_ok=True)
    mountpoint = check_mountpoint(str(mp))
    check_fuse()
    data_dir = Path(args.data_dir) if args.data_dir else default_demo_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"enosfs demo: starting the emulator (demo data in {data_dir}; the first run builds it)",
        flush=True,
    )
    proc, url = start_emulator(data_dir)
    org = os.path.join(mountpoint, DEMO_ORG)
    rel = os.path.relpath(org)
    if rel.startswith(".."):
        rel = org
    mp_rel = os.path.dirname(rel) or "."
    exe = Path(sys.executable).parent / "enosfs"
    tool = os.path.relpath(exe) if exe.exists() else f"{sys.executable} -m enosfs"

    def ready() -> None:
        print(
            f"""
enosfs demo: the demo organisation is mounted at {mountpoint}
  emulator: {url} (pid {proc.pid})

Try, in another terminal:
  ls -lR {rel}
  md5sum {rel}/WTG-001/feature/*
  unzip -l {rel}/WTG-001/feature/commissioning_docs.zip
  sqlite3 {rel}/WTG-002/feature/event_log.db 'select severity, count(*) from events group by 1'
  head {rel}/WTG-001/feature/scada_export.csv
  getfattr -d {rel}/WTG-001/ota/*
  cp -r {rel} /tmp/enos-copy
  {tool} stats {mp_rel} --watch
  {tool} verify {rel}

Press Ctrl-C here to unmount and stop the emulator.
""",
            flush=True,
        )

    try:
        run_foreground(demo_settings(url), mountpoint, ready)
    finally:
        stop_process(proc)
    print("enosfs demo: unmounted and stopped", flush=True)
    return 0


# -- main -------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="enosfs", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"enosfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "mount",
        help="mount EnOS organisations at MOUNTPOINT",
        epilog=describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("mountpoint")
    m.add_argument("--config", "-c", help="TOML configuration file")
    m.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTIONS",
        help="mount(8)-style options: allow_other,cache_dir=DIR,cache_size=2G,... "
        "(all listed below)",
    )
    m.add_argument("--cache-dir", help="keep downloaded blocks on disk here, across remounts")
    m.add_argument(
        "--cache-size",
        help=f"the disk cache's size (default {BY_FIELD['disk_size'].shown_default})",
    )
    m.add_argument("--log-format", choices=["text", "json"], help="default: text")
    m.add_argument(
        "--metrics-addr", metavar="HOST:PORT", help="serve Prometheus metrics here (off by default)"
    )
    m.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (default: return once mounted)",
    )
    m.add_argument(
        "--allow-nonempty", action="store_true", help="mount over a folder that has files in it"
    )
    m.add_argument("--log-level", choices=LOG_LEVELS, help="default: info")
    m.add_argument("--log-file", help="write the log here (background mounts log nowhere else)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--secret-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_mount)

    st = sub.add_parser("stats", help="what a mount is doing (from MOUNTPOINT/.enosfs/stats)")
    st.add_argument("mountpoint")
    st.add_argument("-w", "--watch", action="store_true", help="a live view, refreshed")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    st.add_argument("--count", type=int, help="stop after this many refreshes")
    st.add_argument("--json", action="store_true", help="the raw JSON")
    st.set_defaults(func=cmd_stats)

    v = sub.add_parser("verify", help="check files on a mount against EnOS's md5 or sign")
    v.add_argument("paths", nargs="+", metavar="PATH")
    v.set_defaults(func=cmd_verify)

    r = sub.add_parser(
        "refresh",
        help="make a mount ask EnOS again for a folder's listings and file sizes",
        description="Drop what the mount holds of PATH and everything below it (listings, "
        "file sizes, and the kernel's copy of names and attributes): the next access asks "
        "EnOS again. No root needed: the mounting user asks over the mount's own socket.",
    )
    r.add_argument("path", metavar="PATH", help="a folder or file on an enosfs mount")
    r.add_argument("--all", action="store_true", help="everything the mount holds, not only PATH")
    r.set_defaults(func=cmd_refresh)

    w = sub.add_parser(
        "warm",
        help="fetch a subtree's listings and sizes ahead of its users",
        description="Walk PATH on an enosfs mount with a few threads at once, listing every "
        "folder and asking the size of every file, so the mount holds them for later "
        "walks (until cache.metadata_ttl).",
    )
    w.add_argument("path", metavar="PATH", help="a folder on an enosfs mount")
    w.add_argument(
        "-j", "--jobs", type=int, default=WARM_JOBS, help=f"walkers at once (default {WARM_JOBS})"
    )
    w.set_defaults(func=cmd_warm)

    u = sub.add_parser("umount", help="unmount an enosfs (or any FUSE) mount")
    u.add_argument("mountpoint")
    u.add_argument("-z", "--lazy", action="store_true", help="detach now, clean up when unused")
    u.set_defaults(func=cmd_umount)

    e = sub.add_parser("emulator", help="run an EnOS-compatible server for tests and demos")
    e.add_argument("--host", default="127.0.0.1")
    e.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    e.add_argument(
        "--seed",
        help="'demo'; a seed JSON file or folder holding seed.json; or a generated "
        "organisation, e.g. generate:devices=5000,models=1,products=5,attrs=2,points=1,"
        "firmware=1 (also file_min, file_max, firmware_min, firmware_max, seed, and lark: "
        "the percentage of files kept in object storage)",
    )
    e.add_argument("--data-dir", help="where file bytes and state are kept (default: temporary)")
    e.add_argument("--token-lifetime", type=float, default=7200.0, help="seconds")
    e.add_argument(
        "--objectstore-port",
        type=int,
        default=0,
        help="port of the object store that serves enos-lark:// files (default: any free)",
    )
    e.add_argument(
        "--lark-url-lifetime",
        type=float,
        default=300.0,
        help="seconds a signed object-store URL (getDownloadUrl) is good for",
    )
    e.add_argument("--no-range", action="store_true", help="ignore Range headers (200 + all)")
    e.add_argument(
        "--no-file-info",
        action="store_true",
        help="answer getFileInfo as an older EnOS does (unsupported)",
    )
    e.add_argument("--demo-large-size", default="200MiB", help="size of the demo's large file")
    e.add_argument(
        "--token-rejection",
        default="gateway",
        choices=["gateway", "envelope", "apim"],
        help="how a bad token is answered: HTTP 401, code 1203, or apim_status 4011",
    )
    e.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND:KEY=VALUE,...",
        help="inject a fault, e.g. error:status=503,share=0.1,match=files.* "
        "(kinds: latency error envelope deny reset short stall bandwidth)",
    )
    e.add_argument("--fault-seed", type=int, default=0, help="seed for the faults' dice")
    e.add_argument(
        "--network",
        metavar="rtt=40ms,connect=40ms,conn=25MB/s,link=125MB/s",
        help="play a distant EnOS: a round trip added to every API request, a cost per new "
        "connection (default: rtt), bytes/s per download and for all downloads together "
        "(every part optional)",
    )
    e.add_argument(
        "--rate-limit",
        metavar="N/s",
        help="at most N API calls a second (or N/min) per app; beyond, HTTP 429 with "
        "Retry-After and an envelope with code 99429",
    )
    e.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    e.add_argument("--tls-key", help="the certificate's private key (PEM)")
    e.add_argument("--ready-file", help='write {"url": ..., "data_dir": ...} here once serving')
    e.add_argument(
        "--expose-admin",
        action="store_true",
        help="let clients off loopback use the admin API /__emulator__/ (it hands out tokens)",
    )
    e.set_defaults(func=cmd_emulator)

    d = sub.add_parser("demo", help="emulator + demo data + mount, in the foreground")
    d.add_argument("mountpoint", nargs="?", default="./mnt")
    d.add_argument("--data-dir", help="where the demo data is kept between runs")
    d.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        text = describe(exc)
        if text is None:
            if isinstance(leaf_error(exc), KeyboardInterrupt):
                return 130
            raise
        print(f"enosfs: {text}", file=sys.stderr)
        return EXIT_ERROR
