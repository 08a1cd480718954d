"""Layer 5: real FUSE mounts in a subprocess, driven by ordinary tools."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from enosfs.mount import WARM_CONNECTIONS
from tests.support import (
    Emulator,
    background_mount,
    demo_files,
    emulator,
    enosfs,
    free_port,
    is_mounted,
    mounted,
    run,
    secret_env,
    stats_of,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.mount

BIG = "WTG-001/feature/vibration_raw.bin"


def test_ls_R_shows_the_demo_tree(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        out = run("ls", "-R", m.org)
        assert out.returncode == 0, out.stderr
        found: set[str] = set()
        folder = ""
        for line in out.stdout.splitlines():
            if line.endswith(":"):
                folder = os.path.relpath(line[:-1], m.org)
            elif line and folder.count("/") == 1 and not folder.startswith("by-"):
                found.add(f"{folder}/{line}")  # (by-key/PRODUCT holds links, not files)
        assert found == set(demo_files(emu))


def test_ls_l_sizes_match_without_any_download(emu: Emulator, work: Path) -> None:
    blobs = emu.blobs()
    with mounted(work, emu) as m:
        emu.reset_stats()
        out = run("ls", "-lR", m.org)
        assert out.returncode == 0
        # Listed a moment ago: these stats are `ls -l`'s own, not files named alone.
        for rel, uri in demo_files(emu).items():
            assert (m.org / rel).stat().st_size == blobs[uri]["size"], rel
        stats = emu.stats()
        assert stats.get("files.download", 0) == 0
        assert stats.get("files.download.bytes", 0) == 0


def test_the_first_file_of_a_fresh_mount_costs_no_search_and_no_new_connection(
    emu: Emulator, work: Path
) -> None:
    """Far away each request costs a round trip and each new connection one more: the
    mount's own check of the organisation found its devices, so the first listing asks
    no search again, and the connections opened at mount carry the first requests."""
    firmware = {r.split("/")[0][:3]: (r, u) for r, u in demo_files(emu).items() if "/ota/" in r}
    wanted = [firmware["WTG"], firmware["INV"]]  # two products: two firmware searches
    with mounted(work, emu) as m:
        wait_for(lambda: settled(stats_of(m.path)), "the connections and models of the mount")
        emu.network(network="rtt=50ms")  # so that the two programs' requests overlap
        try:
            emu.reset_stats()
            with ThreadPoolExecutor(len(wanted)) as pool:
                got = list(pool.map(lambda w: (m.org / w[0]).read_bytes(), wanted))
            stats = emu.stats()
        finally:
            emu.network(network="")
        assert got == [emu.blob(uri) for _, uri in wanted]
        assert "devices.search" not in stats
        assert stats["ota-firmwares.search"] == 2 and stats["files.download"] >= 2
        assert stats["connections"] == 1  # the one these stats were asked on


def test_the_first_ls_l_of_a_mount_sends_its_sizes_at_once(emu: Emulator, work: Path) -> None:
    """Whether the server has getFileInfo was learnt at mount, about one file the device
    search showed: the first folder's sizes then go together, not one alone first (a
    round trip more far away)."""
    with mounted(work, emu) as m:
        asked = stats_of(m.path)["requests"]
        assert asked.get("files.getFileInfo") == 1  # the mount's own, to learn it
        folder = m.org / "WTG-002" / "feature"
        emu.network(network="rtt=50ms")  # so that calls sent together overlap
        try:
            emu.reset_stats()
            sizes = [(folder / name).stat().st_size for name in os.listdir(folder)]
            trace = emu.admin("GET", "trace")
        finally:
            emu.network(network="")
    spans = [s for s in trace["spans"] if s["kind"] == "files.getFileInfo"]
    assert len(sizes) >= 4 and len(spans) == len(sizes)
    first_answer = min(s["answered_ms"] for s in spans)
    assert all(s["arrived_ms"] < first_answer for s in spans), spans


def settled(stats: dict[str, Any]) -> bool:
    """The connections opened at mount are open, and the thing models it fetched ahead
    are in, with no request left in flight."""
    return bool(
        stats["connections_opened"] >= WARM_CONNECTIONS
        and stats["requests"].get("thing-models.get", 0) >= 1
        and stats["in_flight"]["connections"] == 0
    )


def test_cp_r_then_cmp_every_byte(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        dest = work / "copy"
        out = run("cp", "-r", m.org, dest)
        assert out.returncode == 0, out.stderr
        for rel, uri in demo_files(emu).items():
            ref = emu.data_dir / "blobs" / hashlib.sha256(uri.encode()).hexdigest()[:32]
            assert run("cmp", dest / rel, ref).returncode == 0, rel
        md5 = run("md5sum", *sorted((m.org / "WTG-002/feature").iterdir()))
        assert md5.returncode == 0
        blobs = emu.blobs()
        files = demo_files(emu)
        for line in md5.stdout.splitlines():
            digest, path = line.split(maxsplit=1)
            assert digest == blobs[files[os.path.relpath(path, m.org)]]["md5"]


def test_zip_sqlite_and_png_read_through_the_mount(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        feature = m.org / "WTG-001/feature"
        with zipfile.ZipFile(feature / "commissioning_docs.zip") as z:
            assert z.testzip() is None
            assert "README.txt" in z.namelist()
        con = sqlite3.connect(f"file:{feature / 'event_log.db'}?mode=ro&immutable=1", uri=True)
        try:
            assert con.execute("select count(*) from events").fetchone()[0] == 500
        finally:
            con.close()
        assert (feature / "nameplate_photo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (feature / "maintenance_notes.txt").read_bytes() == b""
        out = run("unzip", "-l", feature / "commissioning_docs.zip")
        assert out.returncode == 0 and "report/summary.md" in out.stdout


def test_random_preads_match_reference(emu: Emulator, work: Path) -> None:
    want = emu.blob(demo_files(emu)[BIG])
    with mounted(work, emu) as m:
        fd = os.open(m.org / BIG, os.O_RDONLY)
        try:
            rnd = random.Random(5)
            for _ in range(400):
                off = rnd.randrange(len(want))
                n = rnd.choice([1, 512, 4096, 65536, 1 << 20])
                assert os.pread(fd, n, off) == want[off : off + n], (off, n)
            assert os.pread(fd, 100, len(want)) == b""
        finally:
            os.close(fd)


def test_random_4k_preads_fetch_pieces_not_blocks(emu: Emulator, work: Path) -> None:
    """A random reader's miss fetches about what it reads (64-128 KiB on loopback),
    not the 1 MiB block around it; every byte is right."""
    want = emu.blob(demo_files(emu)[BIG])
    with mounted(work, emu) as m:
        emu.reset_stats()
        fd = os.open(m.org / BIG, os.O_RDONLY)
        try:
            rnd = random.Random(12)
            for _ in range(60):
                off = rnd.randrange(len(want) - 4096)
                assert os.pread(fd, 4096, off) == want[off : off + 4096], off
        finally:
            os.close(fd)
        random_reads = stats_of(m.path)["cache"]["random_reads"]
    assert random_reads["misses"] >= 50
    assert random_reads["bytes_fetched"] <= random_reads["fetches"] * 128 * 1024
    # 60 whole blocks would be 60 MiB.
    assert emu.stats()["files.download.bytes"] <= 60 * 2 * 128 * 1024


def test_8_concurrent_readers_cause_one_download_per_block(emu: Emulator, work: Path) -> None:
    uri = demo_files(emu)[BIG]
    size = emu.blobs()[uri]["size"]
    with mounted(work, emu) as m:
        emu.reset_stats()
        procs = [
            subprocess.Popen(["md5sum", str(m.org / BIG)], stdout=subprocess.PIPE, text=True)
            for _ in range(8)
        ]
        sums = [p.communicate(timeout=120)[0].split()[0] for p in procs]
        assert sums == [emu.blobs()[uri]["md5"]] * 8
        assert emu.stats()["files.download.bytes"] == size


def test_file_reachable_by_uri_id_and_enoent(emu: Emulator, work: Path) -> None:
    files = demo_files(emu)
    uri = files["WTG-002/feature/event_log.db"]
    with mounted(work, emu) as m:
        by_id = m.org / "WTG-002/feature" / uri.split("://", 1)[1]
        assert by_id.read_bytes() == emu.blob(uri)
        with pytest.raises(FileNotFoundError):
            (m.org / "WTG-002/feature/0123456789abcdef.txt").read_bytes()
        with pytest.raises(FileNotFoundError):
            os.stat(m.org / "NO-SUCH-ASSET")
        assert run("ls", m.org / "nothing-here").returncode != 0


def test_every_write_fails_with_erofs(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        target = m.org / "WTG-001/feature/model_file.json"
        attempts = [
            lambda: os.open(target, os.O_RDWR),
            lambda: os.open(m.org / "WTG-001/feature/new.txt", os.O_WRONLY | os.O_CREAT),
            lambda: os.mkdir(m.org / "WTG-001/newdir"),
            lambda: os.unlink(target),
            lambda: os.rename(target, m.org / "WTG-001/feature/x"),
            lambda: os.chmod(target, 0o666),
            lambda: os.setxattr(target, "user.x", b"1"),
            lambda: os.truncate(target, 0),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.EROFS
        assert run("touch", m.org / "WTG-001/feature/t").returncode != 0


def test_xattrs_through_the_kernel(emu: Emulator, work: Path) -> None:
    files = demo_files(emu)
    with mounted(work, emu) as m:
        path = m.org / "WTG-001/feature/model_file.json"
        assert (
            os.getxattr(path, "user.enos.uri").decode() == files["WTG-001/feature/model_file.json"]
        )
        assert os.getxattr(path, "user.enos.original_name") == b"wtg-001-model.json"
        assert "user.enos.md5" in os.listxattr(path)
        # Labels and ACLs are not supported, which lets `ls -l` stop asking for them
        # (coreutils remembers ENOTSUP per device); other user attributes are absent.
        for name, err in (
            ("security.selinux", errno.EOPNOTSUPP),
            ("system.posix_acl_access", errno.EOPNOTSUPP),
            ("user.other", errno.ENODATA),
        ):
            with pytest.raises(OSError) as info:
                os.getxattr(path, name)
            assert info.value.errno == err, name
        assert path.read_bytes()  # permissions are the mode bits'


def test_a_read_that_spans_token_expiry_succeeds(demo_emu: Emulator, work: Path) -> None:
    # A second emulator on the same demo data, whose tokens live 2 seconds.
    with emulator(demo_emu.data_dir, "demo", "--token-lifetime", "2") as emu:
        want = emu.blob(demo_files(emu)[BIG])
        with mounted(work, emu) as m, open(m.org / BIG, "rb") as f:
            rnd = random.Random(9)
            deadline = time.monotonic() + 5
            reads = 0
            while time.monotonic() < deadline:
                off = rnd.randrange(len(want) - 4096)
                f.seek(off)
                assert f.read(4096) == want[off : off + 4096]
                reads += 1
                time.sleep(0.2)
            assert reads >= 20
        stats = emu.stats()
        assert stats["token.refresh"] + stats["token.get"] >= 3
        assert stats.get("auth.rejected", 0) == 0


def test_sigterm_unmounts_cleanly(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        assert (m.org / "WTG-001").is_dir()
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(timeout=30) == 0
        assert not is_mounted(m.path)
        assert "SIGTERM received" in m.log_text()


def test_background_mount_then_umount(emu: Emulator, work: Path) -> None:
    mnt = work / "bg"
    mnt.mkdir()
    cfg = write_config(work / "c.toml", emu)
    out, pid = background_mount(cfg, mnt, emu)
    try:
        assert out.returncode == 0 and pid, out.stderr
        assert is_mounted(mnt)
        assert (mnt / emu.org / "WTG-003" / "ota").is_dir()
        assert emu.app_secret not in Path(f"/proc/{pid}/cmdline").read_text()
    finally:
        done = enosfs("umount", mnt)
    assert done.returncode == 0, done.stderr
    assert not is_mounted(mnt)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists(), "the mount process outlived its unmount"


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-mountpoint", "does not exist"),
        ("bad-key", "unknown key 'cache.memroy'"),
        ("wrong-secret", "encryption"),
        ("unknown-org", "orgId does not exist"),
        ("unreachable", "cannot connect"),
        ("not-empty", "not empty"),
        ("unsafe-file-name", "file[0].name 'a\\nb' must not contain NUL or control characters"),
    ],
)
def test_bad_input_is_one_line_and_nothing_mounted(
    emu: Emulator, work: Path, case: str, message: str
) -> None:
    mnt = work / "mnt"
    mnt.mkdir()
    cfg = write_config(work / "c.toml", emu)
    secret = emu.app_secret
    target = mnt
    if case == "missing-mountpoint":
        target = work / "absent"
    elif case == "bad-key":
        cfg.write_text(cfg.read_text() + "[cache]\nmemroy = 1\n")
    elif case == "wrong-secret":
        secret = "not-the-secret"
    elif case == "unknown-org":
        cfg.write_text(cfg.read_text().replace(emu.org, "o-unknown"))
    elif case == "unreachable":
        port = free_port()
        cfg.write_text(
            cfg.read_text().replace(emu.url, f"http://127.0.0.1:{port}")
            + "[network]\ntimeout = 3\n"
        )
    elif case == "not-empty":
        (mnt / "file").write_text("x")
    elif case == "unsafe-file-name":
        cfg.write_text(
            cfg.read_text()
            + f'[[file]]\norg = "{emu.org}"\nasset = "WTG-001"\n'
            'uri = "enos-connect://x.txt"\nname = "a\\nb"\n'
        )
    started = time.monotonic()
    assert_refused(cfg, target, mnt, message, secret, secret)
    assert time.monotonic() - started < 40


def assert_refused(
    cfg: Path, target: Path, mnt: Path, message: str, secret: str, hidden: str
) -> None:
    """`enosfs mount`, in the foreground and not, exits 1 with one line holding message,
    no traceback and nothing of hidden, and mounts nothing."""
    for args in (["-f"], []):
        out = enosfs(
            "mount", *args, "--config", cfg, target, env=secret_env(secret), timeout=60
        )
        assert out.returncode == 1, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("enosfs: "), out.stderr
        assert message in lines[0]
        assert "Traceback" not in out.stderr and hidden not in out.stderr
        assert not is_mounted(mnt)


def test_memory_budget_holds_with_50_open_files(emu: Emulator, work: Path) -> None:
    """50 handles reading at once, with a 64 MiB budget: the mount's peak RSS stays
    within the budget plus 80 MiB (the interpreter and its libraries)."""
    want = emu.blob(demo_files(emu)[BIG])
    with mounted(work, emu, '[cache]\nmemory = "64MiB"\n') as m:
        errors: list[str] = []

        def reader(i: int) -> None:
            start = i * 4 * 1024 * 1024
            with open(m.org / BIG, "rb", buffering=0) as f:
                f.seek(start)
                got = f.read(4 * 1024 * 1024)
            if got != want[start : start + len(got)] or len(got) != 4 * 1024 * 1024:
                errors.append(f"reader {i}: wrong bytes")

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors
        status = Path(f"/proc/{m.proc.pid}/status").read_text()
        peak_kib = int(
            next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
        )
        assert peak_kib * 1024 <= (64 + 80) * 1024 * 1024, f"peak RSS {peak_kib} KiB"


# -- secrets and configuration input -----------------------------------------------------


def _secret_in_proc(pid: int, secret: str) -> list[str]:
    """Where in /proc/PID the secret shows: environ, cmdline."""
    found = []
    for name in ("environ", "cmdline"):
        if secret.encode() in Path(f"/proc/{pid}/{name}").read_bytes():
            found.append(name)
    return found


def test_a_background_mount_keeps_no_secret_in_its_environment(emu: Emulator, work: Path) -> None:
    mnt = work / "bg"
    mnt.mkdir()
    cfg = write_config(work / "c.toml", emu)
    out, pid = background_mount(cfg, mnt, emu)
    try:
        assert out.returncode == 0 and pid, out.stderr
        assert _secret_in_proc(pid, emu.app_secret) == []
        path, uri = next((p, u) for p, u in sorted(demo_files(emu).items()) if "/feature/" in p)
        assert (mnt / emu.org / path).read_bytes() == emu.blob(uri)
    finally:
        done = enosfs("umount", mnt)
    assert done.returncode == 0, done.stderr


def test_a_foreground_mount_keeps_no_secret_in_its_environment(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        assert _secret_in_proc(m.proc.pid, emu.app_secret) == []
        assert (m.org / "WTG-001" / "feature").is_dir()


def _config_with_secret_file(work: Path, emu: Emulator, secret: str) -> tuple[Path, Path]:
    secret_file = work / "app.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    cfg = write_config(work / "c.toml", emu)
    line = f'app_key = "{emu.app_key}"\n'
    cfg.write_text(cfg.read_text().replace(line, f'{line}app_secret_file = "{secret_file}"\n'))
    return cfg, secret_file


def test_a_secret_rotated_in_its_file_is_picked_up_without_a_remount(
    emu: Emulator, work: Path
) -> None:
    cfg, secret_file = _config_with_secret_file(work, emu, emu.app_secret)
    cfg.write_text(cfg.read_text() + '[network]\ntimeout = "3s"\n')
    mnt = work / "mnt"
    mnt.mkdir()
    files = sorted((p, u) for p, u in demo_files(emu).items() if "/feature/" in p)
    (first, first_uri), (path, uri) = files[0], files[1]
    want = emu.blob(uri)
    new_secret = "rotated-secret-9c1e"
    out, pid = background_mount(cfg, mnt, emu)
    try:
        assert out.returncode == 0 and pid, out.stderr
        assert (mnt / emu.org / first).read_bytes() == emu.blob(first_uri)
        target = mnt / emu.org / path  # not read yet: its bytes need a token
        emu.admin("POST", "apps", {"appKey": emu.app_key, "appSecret": new_secret})
        emu.admin("POST", "tokens/revoke")
        with pytest.raises(PermissionError):
            target.read_bytes()
        fresh = work / "app.secret.new"
        fresh.write_text(new_secret + "\n")
        fresh.chmod(0o600)
        fresh.replace(secret_file)
        deadline = time.monotonic() + 20
        got: bytes | None = None
        while got is None and time.monotonic() < deadline:
            try:
                got = target.read_bytes()
            except PermissionError:
                time.sleep(0.25)
        assert got == want, "the new secret in the file was not used"
    finally:
        emu.admin("POST", "apps", {"appKey": emu.app_key, "appSecret": emu.app_secret})
        emu.admin("POST", "tokens/revoke")
        enosfs("umount", mnt)
    assert not is_mounted(mnt)


def test_a_token_service_answering_expire_0_fails_the_mount_at_once(
    emu: Emulator, work: Path
) -> None:
    mnt = work / "mnt"
    mnt.mkdir()
    cfg = write_config(work / "c.toml", emu)
    emu.admin("POST", "tokens/revoke")
    emu.switches(token_lifetime=0)
    try:
        for args in (["-f"], []):
            out = enosfs(
                "mount", *args, "--config", cfg, mnt, env=secret_env(emu.app_secret), timeout=60
            )
            assert out.returncode == 1, out
            assert out.stderr.count("\n") == 1, out.stderr
            assert "expire=0" in out.stderr and "Traceback" not in out.stderr
            assert not is_mounted(mnt)
    finally:
        emu.admin("POST", "tokens/revoke")


@pytest.mark.parametrize(
    ("gateway", "message"),
    [
        ("http://[::1", "enos.gateway is not a valid URL (Invalid IPv6 URL)"),
        ("http://127.0.0.1:99999", "enos.gateway is not a valid URL (Port out of range"),
        ("http://127.0.0.1:abc", "enos.gateway is not a valid URL"),
        ("http://admin:hunter2-pw@127.0.0.1:1", "enos.gateway must not hold credentials"),
        ("https://admin:hunter2-pw@[::1", "enos.gateway must not hold credentials"),
        ("fifo", "is not a regular file"),
    ],
)
def test_bad_urls_and_a_fifo_secret_are_one_line_exit_1(
    emu: Emulator, work: Path, gateway: str, message: str
) -> None:
    mnt = work / "mnt"
    mnt.mkdir()
    cfg = write_config(work / "c.toml", emu)
    if gateway == "fifo":
        fifo = work / "secret.fifo"
        os.mkfifo(fifo, 0o600)
        line = f'app_key = "{emu.app_key}"\n'
        cfg.write_text(cfg.read_text().replace(line, f'{line}app_secret_file = "{fifo}"\n'))
    else:
        cfg.write_text(cfg.read_text().replace(f'"{emu.url}"', f'"{gateway}"'))
    assert_refused(cfg, mnt, mnt, message, "s", "hunter2")
