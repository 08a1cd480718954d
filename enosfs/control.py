"""The mount's control socket: how `enosfs refresh` reaches a running mount, without root.

The file system is read-only, and the kernel refuses a write to it before the mount
sees one, so a request cannot travel as a write to a magic file; a side effect hidden
in a read (a lookup or a getxattr of a magic name) would fire for any program that
happens to probe that name. So the mount listens on a Unix socket of its own:

- in a private folder made for it (mode 0700, a random name, made atomically by
  mkdtemp) in $XDG_RUNTIME_DIR when that is the user's own, else in the temporary
  folder, so nobody else can reach the socket, or put one in its place;
- the socket itself mode 0600, and each caller's uid checked (SO_PEERCRED): the
  mounting user, or root;
- its path advertised in /.enosfs/control (JSON), so a command finds it from the mount.

One request a connection, one JSON object on one line each way. The socket goes with
the mount; what a mount killed with SIGKILL leaves behind, the next mount removes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from enosfs.errors import EnosfsError

if TYPE_CHECKING:
    from enosfs.changes import Changes
    from enosfs.namespace import Namespace, Node

log = logging.getLogger(__name__)

CONTROL_FILE = "control"  # in /.enosfs
SOCKET_NAME = "control.sock"
FOLDER_PREFIX = "enosfs-control-"  # then the mount's pid, then mkdtemp's random part
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0  # for the request to arrive, not for the answer
ANSWER_TIMEOUT = 300.0  # the client's: a refresh of everything tells the kernel a lot
_UNIX_PATH_MAX = 107


def sweep(parent: str) -> None:
    """Remove the socket folders of this user's mounts that died without cleaning up
    (SIGKILL): those whose process is gone and whose socket nobody listens on. A live
    mount's pid is in its folder's name: a pid still in use (even reused) keeps it."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(FOLDER_PREFIX):
            continue
        pid = entry.name[len(FOLDER_PREFIX) :].split("-")[0]
        try:
            if not pid.isdigit() or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            sock = os.path.join(entry.path, SOCKET_NAME)
            if _listening(sock):
                continue  # a mount in another pid namespace, sharing this folder
            with contextlib.suppress(OSError):
                os.unlink(sock)
            with contextlib.suppress(OSError):
                os.rmdir(entry.path)
        except OSError:
            continue  # alive (another user's pid: EPERM), or not ours to judge


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def runtime_dir() -> str | None:
    """$XDG_RUNTIME_DIR if it is this user's private folder; None: the temporary one."""
    path = os.environ.get("XDG_RUNTIME_DIR")
    # Room left for FOLDER_PREFIX, a pid, mkdtemp's part and the socket's name.
    if not path or len(path) > _UNIX_PATH_MAX - 50:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return path


class ControlServer:
    """Serves refresh requests for one mount's namespace."""

    def __init__(self, ns: Namespace, changes: Changes) -> None:
        self.ns = ns
        self.changes = changes
        self.folder: str | None = None
        self.path: str | None = None
        self.error: str | None = None  # why there is no socket
        self._listener: trio.SocketListener | None = None

    async def open(self) -> None:
        """Make the socket; a mount that cannot still serves files (the log says so)."""
        try:
            parent = runtime_dir()
            sweep(parent or tempfile.gettempdir())
            self.folder = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=parent)
            path = os.path.join(self.folder, SOCKET_NAME)
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.bind(path)
                os.chmod(path, 0o600)
                sock.listen(16)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            self.error = exc.strerror or str(exc)
            log.warning("no control socket (%s): enosfs refresh cannot reach this mount", exc)
            self.close()
            return
        self.path = path
        self._listener = trio.SocketListener(sock)

    def advert(self) -> bytes:
        """/.enosfs/control: where the socket is, and whose it is."""
        doc = {"socket": self.path, "pid": os.getpid(), "uid": os.getuid()}
        if self.error is not None:
            doc["error"] = self.error
        return (json.dumps(doc) + "\n").encode()

    async def serve(self) -> None:
        if self._listener is None:
            return
        await trio.serve_listeners(self._handle, [self._listener])

    def close(self) -> None:
        if self.folder is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.folder, SOCKET_NAME))
        with contextlib.suppress(OSError):
            os.rmdir(self.folder)
        self.folder = self.path = None

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection. Nothing may escape: serve_listeners would take the mount down."""
        async with stream:
            try:
                uid = peer_uid(stream.socket)
                if uid not in (os.getuid(), 0):
                    log.info("control socket: refused a request from uid %s", uid)
                    answer: dict[str, Any] = {"ok": False, "error": "not the mounting user"}
                else:
                    with trio.fail_after(REQUEST_TIMEOUT):
                        request = await read_line(stream)
                    answer = await self.answer(request)
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except BadRequest as exc:
                answer = {"ok": False, "error": str(exc)}
            except Exception:
                log.exception("control socket: unexpected error")
                answer = {"ok": False, "error": "unexpected error (see the mount's log)"}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all((json.dumps(answer) + "\n").encode())

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") != "refresh":
            raise BadRequest(f"unknown request {request.get('op')!r}")
        path = request.get("path")
        if not isinstance(path, str):
            raise BadRequest("a refresh names a path")
        node = self.ns.known(path)
        shown = "/" + path.strip("/")
        if node is None:
            return {
                "ok": False,
                "missing": True,
                "error": f"{shown} is not known to this mount (refresh the folder that holds it)",
            }
        expired = self.ns.refresh(node)
        await self.changes.refreshed(expired)
        await self._forget_kept(node)
        log.info(
            "refresh of %s: %d folders, %d files to be asked again",
            node.path,
            expired.folders,
            expired.files,
        )
        return {"ok": True, "path": node.path, "folders": expired.folders, "files": expired.files}

    async def _forget_kept(self, node: Node) -> None:
        """Drop what the metadata store holds of node's subtree, on disk before the
        answer: a remount right after must ask EnOS, not serve the records the refresh
        was meant to replace (they are within their TTL, and would be)."""
        store = self.ns.catalog.store
        scope = store_scope(node)
        if store is None or scope is None:
            return
        store.forget(scope)
        if await store.flush():
            log.warning("refresh of %s: the metadata store could not drop it in time", node.path)


def store_scope(node: Node) -> tuple[str, ...] | None:
    """The metadata store's part of node's subtree (see MetaStore.forget): its org,
    asset, category and fileUri as far as node has them; None for the mount's own."""
    from enosfs.namespace import Dir, DirKind, File

    if isinstance(node, File):
        ref = node.ref
        return (ref.org, ref.asset, ref.category, ref.uri)
    if not isinstance(node, Dir) or node.kind is DirKind.CONTROL:
        return None
    scope: list[str] = []
    for part in (node.org, node.asset, node.category):
        if not part:
            break
        scope.append(part)
    return tuple(scope)


class BadRequest(Exception):
    """A request the mount cannot act on: answered, never raised further."""


async def read_line(stream: trio.SocketStream) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise BadRequest("request too long")
    try:
        doc = json.loads(data)
    except ValueError:
        raise BadRequest("a request is one JSON object on one line") from None
    if not isinstance(doc, dict):
        raise BadRequest("a request is one JSON object on one line")
    return doc


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of a Unix socket, as the kernel says."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


# -- the client side --------------------------------------------------------------------


def socket_of(mountpoint: str) -> tuple[str, int | None]:
    """The control socket a mount advertises, and the uid it belongs to."""
    from enosfs.namespace import CONTROL_DIR

    advert = Path(mountpoint) / CONTROL_DIR / CONTROL_FILE
    try:
        doc = json.loads(advert.read_bytes())
    except FileNotFoundError:
        raise EnosfsError(
            f"{mountpoint}: this mount has no control socket (a mount of an older enosfs?)"
        ) from None
    except OSError as exc:
        raise EnosfsError(f"{mountpoint}: cannot read {advert}: {exc.strerror}") from None
    except ValueError:
        raise EnosfsError(f"{mountpoint}: {advert} is not JSON") from None
    if not doc.get("socket"):
        why = doc.get("error") or "unknown"
        raise EnosfsError(f"{mountpoint}: the mount could not open its control socket ({why})")
    uid = doc.get("uid")
    return str(doc["socket"]), uid if isinstance(uid, int) else None


def ask(
    mountpoint: str, request: dict[str, Any], timeout: float = ANSWER_TIMEOUT
) -> dict[str, Any]:
    """Send one request to a mount and return its answer."""
    path, owner = socket_of(mountpoint)
    return send(path, request, where=mountpoint, owner=owner, timeout=timeout)


def send(
    path: str,
    request: dict[str, Any],
    *,
    where: str,
    owner: int | None = None,
    timeout: float = ANSWER_TIMEOUT,
) -> dict[str, Any]:
    """One request to the control socket at `path`; errors name `where` (the mount)
    and, for a caller turned away, `owner` (the mounting user's uid)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except PermissionError:
            raise EnosfsError(
                f"{where}: only the user who mounted it{_user(owner)} or root can ask it this"
            ) from None
        except OSError as exc:
            raise EnosfsError(
                f"{where}: its control socket does not answer ({exc.strerror}); "
                "is the mount process still running?"
            ) from None
        try:
            sock.sendall((json.dumps(request) + "\n").encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise EnosfsError(f"{where}: no answer within {timeout:g}s") from None
        except OSError as exc:
            raise EnosfsError(f"{where}: the request broke off ({exc.strerror})") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise EnosfsError(f"{where}: the mount gave no answer") from None
    if not isinstance(answer, dict):
        raise EnosfsError(f"{where}: the mount gave no answer")
    return answer


def _user(uid: int | None) -> str:
    if uid is None:
        return ""
    with contextlib.suppress(KeyError, ImportError):
        import pwd

        return f" ({pwd.getpwuid(uid).pw_name})"
    return f" (uid {uid})"
