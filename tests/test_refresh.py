"""`enosfs refresh` and `enosfs warm`: what a refresh makes the mount ask again (in
process, on the fake organisation, calls counted), the control socket it travels over
(a real Unix socket), and both commands on a real mount over the emulator."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio

from enosfs.changes import Changes
from enosfs.control import FOLDER_PREFIX, SOCKET_NAME, ControlServer, send, sweep
from enosfs.errors import EnosfsError
from enosfs.expiring import Expiring
from enosfs.namespace import CONTROL_DIR, Dir, File, Namespace
from enosfs.warm import warm
from tests.fake_listings import ORG
from tests.support import Emulator, demo_files, emulator, enosfs, md5, mounted, run, wait_for
from tests.test_catalog import Clock, demo, settings

LONG_TTL = '[cache]\nmetadata_ttl = "1h"\n[kernel]\nattr_timeout = "1h"\nentry_timeout = "1h"\n'


# -- what a refresh expires -------------------------------------------------------------


def test_an_expired_entry_is_asked_again_but_its_last_answer_stays() -> None:
    clock = Clock()
    kept: Expiring[tuple[str, str], int] = Expiring(60.0, clock)
    kept.put(("o", "a"), 1)
    kept.put(("o", "b"), 2)
    kept.put(("p", "a"), 3)
    kept.expire_where(lambda key: key[0] == "o")
    assert kept.fresh(("o", "a")) is None and kept.fresh(("o", "b")) is None
    assert kept.last(("o", "a")) == 1  # still there for when asking fails
    assert kept.fresh(("p", "a")) == 3


async def walk(ns: Namespace, asset: str) -> None:
    """List an asset's folders and size their files, as `ls -lR` would."""
    org = await ns.lookup(ns.root, ORG)
    assert isinstance(org, Dir)
    folder = await ns.lookup(org, asset)
    assert isinstance(folder, Dir)
    for category in ("feature", "ota"):
        d = await ns.lookup(folder, category)
        assert isinstance(d, Dir)
        for node in (await ns.children(d)).values():
            assert isinstance(node, File)
            await ns.file_meta(node)


async def test_a_refresh_asks_again_for_its_subtree_only() -> None:
    fake, _ = demo()
    ns = Namespace(fake, settings(), clock=Clock())
    for asset in ("WTG-001", "WTG-002", "INV-101"):
        await walk(ns, asset)
    before = fake.counts.copy()
    for asset in ("WTG-001", "WTG-002", "INV-101"):
        await walk(ns, asset)
    assert fake.counts == before, "within the TTL, nothing is asked again"

    assert ns.known("") is ns.root
    assert ns.known(f"{ORG}/WTG-009") is None
    assert ns.known(f"{ORG}/WTG-002/feature/nope.pdf") is None
    assert isinstance(ns.known(f"/{ORG}/WTG-002/feature/manual.pdf/"), File)
    node = ns.known(f"{ORG}/WTG-002")
    assert node is not None
    expired = ns.refresh(node)
    assert (expired.folders, expired.files) == (3, 5)  # the asset, feature/ and ota/
    assert len(expired.inodes) == 5 and len(expired.names) == 5

    await walk(ns, "WTG-001")
    await walk(ns, "INV-101")
    assert fake.counts == before, "a refresh of one asset leaves the others alone"
    await walk(ns, "WTG-002")
    again = fake.counts - before
    # Its device, thing model, latest values and firmware list, and every size that
    # was not in the firmware list.
    assert again["devices.get"] == 1
    assert again["thing-models.get"] == 1
    assert again["measurepoints.queryLatest"] == 1
    assert again["ota-firmwares.search"] == 1
    # Three feature files, and the firmware the search left unsized.
    assert again["files.getFileInfo"] == 4
    assert again["devices.search"] == 0, "the organisation's listing was not refreshed"


async def test_a_refresh_of_a_file_asks_for_its_record_and_its_folder() -> None:
    fake, _ = demo()
    ns = Namespace(fake, settings(), clock=Clock())
    await walk(ns, "WTG-001")
    before = fake.counts.copy()
    node = ns.known(f"{ORG}/WTG-001/feature/manual.pdf")
    assert isinstance(node, File)
    expired = ns.refresh(node)
    assert (expired.folders, expired.files) == (0, 1)
    await walk(ns, "WTG-001")
    again = fake.counts - before
    assert again["files.getFileInfo"] == 1
    assert again["measurepoints.queryLatest"] == 1  # its folder was listed again


# -- the walk ---------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_warm_counts_folders_files_and_errors_of_any_tree(tmp_path: Path) -> None:
    for rel in ("a/b/c", "a/d", "e"):
        (tmp_path / rel).mkdir(parents=True)
    for rel in ("a/b/c/1", "a/b/2", "a/3", "e/4", "5"):
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / CONTROL_DIR).mkdir()  # skipped at a mount's root only
    out, err = io.StringIO(), Terminal()
    assert warm(str(tmp_path), "T", jobs=3, at_mount_root=True, out=out, err=err) == 0
    assert out.getvalue().startswith("warmed T: 6 folders, 5 files in ")
    assert out.getvalue().endswith(", 0 errors\n")
    out = io.StringIO()
    assert warm(str(tmp_path), "T", jobs=1, at_mount_root=False, out=out, err=err) == 0
    assert out.getvalue().startswith("warmed T: 7 folders, 5 files in ")
    out, err = io.StringIO(), Terminal()
    assert warm(str(tmp_path / "gone"), "G", jobs=2, at_mount_root=False, out=out, err=err) == 1
    assert out.getvalue().startswith("warmed G: 0 folders, 0 files in ")
    assert "No such file or directory" in err.getvalue()


# -- the control socket -----------------------------------------------------------------


async def test_the_control_socket_is_private_and_answers_in_one_line(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A short path, as /run/user/UID is: a socket's path has at most 107 bytes.
    runtime = Path(tempfile.mkdtemp(prefix="rt-"))
    request.addfinalizer(lambda: shutil.rmtree(runtime, ignore_errors=True))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    fake, _ = demo()
    ns = Namespace(fake, settings(), clock=Clock())
    await walk(ns, "WTG-001")
    async with trio.open_nursery() as nursery:
        server = ControlServer(ns, Changes(nursery))
        await server.open()
        folder = server.folder
        try:
            assert server.path is not None and folder is not None
            assert Path(folder).parent == runtime
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
            sock = os.stat(server.path)
            assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
            assert sock.st_uid == os.getuid()
            advert = json.loads(server.advert())
            assert advert["socket"] == server.path and advert["pid"] == os.getpid()
            nursery.start_soon(server.serve)

            def ask(op: str, path: str) -> dict[str, Any]:
                assert server.path is not None
                return send(server.path, {"op": op, "path": path}, where="MNT", timeout=30)

            answer = await trio.to_thread.run_sync(ask, "refresh", f"{ORG}/WTG-001")
            assert answer == {"ok": True, "path": f"/{ORG}/WTG-001", "folders": 3, "files": 5}
            answer = await trio.to_thread.run_sync(ask, "refresh", "nope")
            assert answer["ok"] is False and answer["missing"] is True
            answer = await trio.to_thread.run_sync(ask, "delete", "")
            assert answer["ok"] is False and "unknown request" in str(answer["error"])
            nursery.cancel_scope.cancel()
        finally:
            server.close()
    assert folder is not None and not os.path.exists(folder), "the socket goes with it"
    with pytest.raises(EnosfsError, match="does not answer"):
        send(str(runtime / "nothing.sock"), {"op": "refresh"}, where="MNT", timeout=5)


def test_a_killed_mounts_socket_folder_is_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()

    def folder(pid: int, tag: str, listen: bool) -> tuple[Path, socket.socket]:
        d = tmp_path / f"{FOLDER_PREFIX}{pid}-{tag}"
        d.mkdir(mode=0o700)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(d / SOCKET_NAME))
        if listen:
            sock.listen(1)
        return d, sock

    stale, s1 = folder(dead.pid, "a", listen=False)
    elsewhere, s2 = folder(dead.pid, "b", listen=True)  # another pid namespace's mount
    alive, s3 = folder(os.getpid(), "c", listen=False)
    other = tmp_path / "enosfs-soak-1"
    other.mkdir()
    try:
        sweep(str(tmp_path))
    finally:
        for s in (s1, s2, s3):
            s.close()
    assert not stale.exists()
    assert elsewhere.exists() and alive.exists() and other.exists()


# -- on a real mount --------------------------------------------------------------------


def api_calls(emu: Emulator) -> dict[str, int]:
    """The requests the emulator answered since its counters were reset, by kind (not
    the connections it accepted: the test's own admin requests open those)."""
    return {k: v for k, v in emu.stats().items() if k != "connections"}


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.mount
def test_refresh_shows_a_changed_file_at_once(
    work: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Metadata kept for an hour, by the mount and by the kernel: a refresh makes the
    next access see a file changed on the server, under its old fileUri or a new one."""
    with emulator(tmp_path_factory.mktemp("refresh-data")) as emu:
        files = demo_files(emu)
        same_uri = "WTG-002/feature/scada_export.csv"
        new_uri = "WTG-002/feature/model_file.json"
        with mounted(work, emu, LONG_TTL) as m:
            control = json.loads((m.path / ".enosfs/control").read_bytes())
            sock = os.stat(control["socket"])
            assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
            assert sock.st_uid == os.getuid() == control["uid"]
            assert stat.S_IMODE(os.stat(os.path.dirname(control["socket"])).st_mode) == 0o700

            old = (m.org / same_uri).read_bytes()
            assert old == emu.blob(files[same_uri])
            old_spec = (m.org / new_uri).read_bytes()
            feature = {"orgId": emu.org, "assetId": "WTG-002"}
            emu.admin(
                "POST",
                "replace",
                {
                    **feature,
                    "feature": "scada_export",
                    "kind": "measurepoints",
                    "text": "time,power\n0,1\n",
                    "keep_uri": True,
                },
            )
            emu.admin(
                "POST",
                "replace",
                {**feature, "feature": "model_file", "text": '{"v": 2}\n', "name": "v2.json"},
            )
            # Within the TTL, the mount and the kernel still show what they hold.
            assert (m.org / same_uri).read_bytes() == old
            assert (m.org / new_uri).read_bytes() == old_spec

            out = enosfs("refresh", m.org / "WTG-002")
            assert out.returncode == 0, out.stderr
            assert one_line(out.stdout).startswith(f"refreshed {m.org / 'WTG-002'}: 3 folders")
            assert os.stat(m.org / same_uri).st_size == len(b"time,power\n0,1\n")
            assert (m.org / same_uri).read_bytes() == b"time,power\n0,1\n"
            assert (m.org / new_uri).read_bytes() == b'{"v": 2}\n'
            assert md5(m.org / same_uri) == emu.blobs()[files[same_uri]]["md5"]

            # A name the mount does not know, and a path on no enosfs mount.
            out = enosfs("refresh", m.org / "WTG-404")
            assert out.returncode == 2 and "not known to the mount" in one_line(out.stderr)
            out = enosfs("refresh", work)
            assert out.returncode == 2
            assert one_line(out.stderr) == f"enosfs: {work} is not on an enosfs mount"
            # Everything, named by any path on the mount.
            out = enosfs("refresh", "--all", m.org / "WTG-001")
            assert out.returncode == 0, out.stderr
            assert one_line(out.stdout).startswith(f"refreshed {m.path}: ")
        assert not os.path.exists(control["socket"]), "the socket goes with the mount"


@pytest.mark.mount
def test_warm_visits_everything_so_a_walk_after_asks_nothing(emu: Emulator, work: Path) -> None:
    files = demo_files(emu)
    assets = {rel.split("/")[0] for rel in files}
    with mounted(work, emu, LONG_TTL) as m:
        out = enosfs("warm", m.org, "--jobs", "4")
        assert out.returncode == 0, out.stderr
        # The org, each asset with its two categories, and by-name/, by-key/ with the
        # demo's two products (their links are not walked: they name the same assets).
        want = f"{1 + 3 * len(assets) + 2 + 2} folders, {len(files)} files"
        assert one_line(out.stdout).startswith(f"warmed {m.org}: {want} in "), out.stdout
        assert one_line(out.stdout).endswith(", 0 errors")
        emu.reset_stats()
        listing = run("ls", "-lR", m.org)
        assert listing.returncode == 0, listing.stderr
        assert all(name in listing.stdout for name in {Path(rel).name for rel in files})
        assert api_calls(emu) == {}

        out = enosfs("warm", work)
        assert out.returncode == 2
        assert one_line(out.stderr) == f"enosfs: {work} is not on an enosfs mount"
        out = enosfs("warm", m.org / "WTG-001/feature/scada_export.csv")
        assert out.returncode == 2 and "not a folder" in one_line(out.stderr)


@pytest.mark.mount
def test_warm_stops_on_ctrl_c_with_one_line(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        emu.faults({"kind": "latency", "seconds": 2})
        emu.reset_stats()
        proc = subprocess.Popen(
            [sys.executable, "-m", "enosfs", "warm", str(m.org)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: api_calls(emu), "the walk to reach EnOS")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, err
        assert out == ""
        assert "interrupted" in one_line(err)
