"""Starting the emulator: its state from a seed or a data folder, served by uvicorn.

The socket is bound before uvicorn starts so that `--port 0` works: the chosen address
is printed on one line (and written to --ready-file) only once requests can be served.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from enosfs.emulator.app import KEEP_ALIVE, Emulator, InjectedCut, Switches, is_loopback
from enosfs.emulator.demo import LARGE_DEFAULT, build_demo
from enosfs.emulator.faults import Faults
from enosfs.emulator.generate import PREFIX, GenerateSpec, build_generated, parse_spec
from enosfs.emulator.network import NetworkProfile, distant_protocol
from enosfs.emulator.ratelimit import RateLimit
from enosfs.emulator.state import STATE_FILE, SeedError, State, build_state, load_seed, reset_dir


@dataclass
class EmulatorOptions:
    host: str = "127.0.0.1"
    port: int = 0
    seed: str | None = None
    data_dir: str | None = None
    demo_large_size: int = LARGE_DEFAULT
    ready_file: str | None = None
    switches: Switches | None = None
    faults: Faults | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    expose_admin: bool = False
    network: NetworkProfile | None = None
    rate_limit: RateLimit | None = None
    objectstore_port: int = 0  # where signed URLs point (enos-lark:// files); 0: any


# A reply held by a fault (stall, bandwidth) may keep shutdown waiting this long at most.
GRACEFUL_SHUTDOWN = 1  # whole seconds: uvicorn takes an int


def _fingerprint(*parts: bytes) -> str:
    """Changes whenever the state a seed builds could: its content or the code."""
    from enosfs.emulator import content, demo, generate, state

    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    for module in (demo.__file__, state.__file__, generate.__file__, content.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:24]


def _reusable(data_dir: Path, fingerprint: str) -> State | None:
    if (data_dir / STATE_FILE).exists():
        with suppress(ValueError, KeyError, OSError, TypeError):
            state = State.load(data_dir)
            if state.fingerprint == fingerprint:
                return state
    return None


def prepare_state(seed: str | None, data_dir: Path, large_size: int) -> State:
    """Load or build the state in data_dir; one already built from the same seed is reused."""
    if seed is None:
        if (data_dir / STATE_FILE).exists():
            return State.load(data_dir)
        raise SeedError(f"nothing to serve: give --seed, or a --data-dir holding {STATE_FILE}")
    spec: GenerateSpec | None = None
    if seed == "demo":
        fingerprint = _fingerprint(b"demo", str(large_size).encode())
    elif seed.startswith(PREFIX):
        spec = parse_spec(seed)
        fingerprint = _fingerprint(b"generate", spec.canonical().encode())
    else:
        doc, base = load_seed(Path(seed))
        fingerprint = _fingerprint(json.dumps(doc, sort_keys=True).encode(), str(base).encode())
    state = _reusable(data_dir, fingerprint)
    if state is not None:
        return state
    reset_dir(data_dir)
    if seed == "demo":
        src = data_dir / "demo-src"
        state = build_state(build_demo(src, large_size), src, data_dir)
        shutil.rmtree(src, ignore_errors=True)
    elif spec is not None:
        state = build_generated(spec, data_dir)
    else:
        state = build_state(doc, base, data_dir)
    state.fingerprint = fingerprint
    state.save()
    return state


class _QuietCuts(logging.Filter):
    """Injected body cuts are wanted, not errors: keep them out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, InjectedCut)


def by_port(apis: ASGIApp, store: ASGIApp, store_port: int) -> ASGIApp:
    """One server, two faces: requests that came in on the object store's socket go to
    the object store, all others to the EnOS APIs. (One uvicorn server for both keeps a
    single shutdown and signal handling.)"""

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        app = store if server is not None and server[1] == store_port else apis
        await app(scope, receive, send)

    return route


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this: without it a response's head and body, written
    # separately, meet Nagle and the client's delayed ACK, 40 ms a request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM ends the process through `finally` blocks (the temporary data folder is
    removed), instead of killing it where it stands."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextmanager
def _signals_noted(seen: list[int]) -> Iterator[None]:
    """While uvicorn serves, a SIGTERM is noted, not fatal: uvicorn catches it itself and
    raises it again once it has shut down, which must then find a harmless handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, lambda signum, _frame: seen.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def admin_warning(host: str, expose_admin: bool) -> str | None:
    """The start-up warning for an emulator that others than this machine can reach."""
    if is_loopback(host):
        return None
    if expose_admin:
        return (
            f"WARNING: listening on {host}: the admin API (/__emulator__/, which hands out "
            "live tokens and rewrites data) is open to anyone who can reach it"
        )
    return (
        f"WARNING: listening on {host}: the EnOS APIs are open to anyone who can reach it; "
        "the admin API (/__emulator__/) answers loopback clients only (--expose-admin opens it)"
    )


def serve(opts: EmulatorOptions) -> int:
    with _sigterm_exits():
        return _serve(opts)


def _serve(opts: EmulatorOptions) -> int:
    import uvicorn

    temp: str | None = None
    if opts.data_dir:
        data_dir = Path(opts.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.mkdtemp(prefix="enosfs-emulator-")
        data_dir = Path(temp)
    try:
        try:
            state = prepare_state(opts.seed, data_dir, opts.demo_large_size)
        except (SeedError, OSError, KeyError, TypeError) as exc:
            print(f"enosfs emulator: {exc}", file=sys.stderr)
            return 2
        sockets: list[socket.socket] = []
        for wanted in (opts.port, opts.objectstore_port):
            try:
                sockets.append(bind(opts.host, wanted))
            except OSError as exc:
                for bound in sockets:
                    bound.close()
                print(
                    f"enosfs emulator: cannot listen on {opts.host}:{wanted}: {exc.strerror}",
                    file=sys.stderr,
                )
                return 2
        sock, store_sock = sockets
        emulator = Emulator(
            state,
            opts.switches,
            opts.faults,
            expose_admin=opts.expose_admin,
            network=opts.network,
            rate_limit=opts.rate_limit,
        )
        logging.getLogger("uvicorn.error").addFilter(_QuietCuts())
        # Writes to a connection the client dropped are expected under faults.
        logging.getLogger("asyncio").setLevel(logging.ERROR)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if opts.tls_cert else "http"
        url = f"{scheme}://{shown}:{port}"
        store_port = store_sock.getsockname()[1]
        emulator.objectstore.base_url = f"{scheme}://{shown}:{store_port}"
        config = uvicorn.Config(
            by_port(emulator.app(), emulator.objectstore.app(), store_port),
            ssl_certfile=opts.tls_cert,
            ssl_keyfile=opts.tls_key,
            log_level="warning",
            access_log=False,
            lifespan="off",
            # httptools, with the network profile's connect cost (none by default).
            http=distant_protocol(emulator.network, emulator.counts),
            loop="uvloop",
            timeout_keep_alive=KEEP_ALIVE,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN,
        )
        server = uvicorn.Server(config)
        warning = admin_warning(opts.host, opts.expose_admin)
        if warning:
            print(f"enosfs emulator: {warning}", file=sys.stderr, flush=True)
        seen: list[int] = []

        async def stop_when_told() -> None:
            # Replies held by faults watch `stopping`, so that shutdown is not held up.
            while not server.should_exit and not seen:
                await asyncio.sleep(0.05)
            server.should_exit = True
            emulator.stopping.set()

        async def main() -> None:
            task = asyncio.create_task(server.serve(sockets=[sock, store_sock]))
            watcher = asyncio.create_task(stop_when_told())
            while not server.started and not task.done():
                await asyncio.sleep(0.01)
            if server.started:
                if opts.ready_file:
                    Path(opts.ready_file).write_text(
                        json.dumps(
                            {
                                "url": url,
                                "objectstore_url": emulator.objectstore.base_url,
                                "data_dir": str(data_dir),
                            }
                        )
                    )
                orgs = ", ".join(state.orgs) or "none"
                print(
                    f"enosfs emulator listening on {url} (orgs: {orgs}; data in {data_dir})",
                    flush=True,
                )
            try:
                await task
            finally:
                watcher.cancel()

        with _signals_noted(seen):
            asyncio.run(main())
        return 0
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
