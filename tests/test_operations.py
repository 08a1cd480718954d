"""Operating a mount: what `enosfs mount` checks before mounting, what `enosfs umount`
will and will not unmount, crashed mounts, the kernel's read-ahead, plain HTTP."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from enosfs.config import SECRET_ENV
from enosfs.mount import is_loopback_host, mount_entry
from tests.support import (
    Emulator,
    background_mount,
    demo_files,
    emulator,
    enosfs,
    is_mounted,
    mounted,
    secret_env,
    stats_of,
    tmpfs_at,
    write_config,
)
from tests.test_faults import make_cert

CSV = "WTG-002/feature/scada_export.csv"


def wait_gone(pid: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{pid}").exists(), f"process {pid} is still there"


# -- enosfs umount ----------------------------------------------------------------------


@pytest.mark.skipif(os.getuid() != 0, reason="mounting a tmpfs needs root")
def test_umount_refuses_what_is_not_a_fuse_mount(work: Path) -> None:
    with tmpfs_at(work / "t") as t:
        out = enosfs("umount", t)
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "not a FUSE mount (it is tmpfs)" in lines[0], out.stderr
        assert is_mounted(t)
    plain = work / "plain"
    plain.mkdir()
    out = enosfs("umount", plain)
    assert out.returncode == 1 and "is not a mountpoint" in out.stderr
    assert out.stderr.count("\n") == 1


# -- a crashed mount --------------------------------------------------------------------


@pytest.mark.mount
def test_a_killed_mount_is_cleaned_up_and_mounted_again_at_once(emu: Emulator, work: Path) -> None:
    """Right after kill -9 the kernel still answers stat from cached attributes; the
    next `enosfs mount` must see the mount is dead anyway, clean it and mount."""
    mnt = work / "mnt"
    mnt.mkdir()
    cfg = write_config(work / "c.toml", emu)
    out, pid = background_mount(cfg, mnt, emu)
    assert out.returncode == 0 and pid, out.stderr
    pid2 = None
    try:
        os.stat(mnt / emu.org)  # attributes now in the kernel's cache
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        out, pid2 = background_mount(cfg, mnt, emu)
        assert out.returncode == 0 and pid2, out.stderr
        assert "dead FUSE mount" in out.stderr
        uri = demo_files(emu)[CSV]
        assert (mnt / emu.org / CSV).read_bytes() == emu.blob(uri)
    finally:
        done = enosfs("umount", mnt)
    assert done.returncode == 0, done.stderr
    assert not is_mounted(mnt)
    if pid2:
        wait_gone(pid2)


@pytest.mark.mount
def test_a_dead_mount_can_be_unmounted(emu: Emulator, work: Path) -> None:
    mnt = work / "mnt"
    mnt.mkdir()
    cfg = write_config(work / "c.toml", emu)
    out, pid = background_mount(cfg, mnt, emu)
    assert out.returncode == 0 and pid, out.stderr
    try:
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        with pytest.raises(OSError):
            os.listdir(mnt)
    finally:
        done = enosfs("umount", mnt)
    assert done.returncode == 0, done.stderr
    assert not is_mounted(mnt)


# -- kernel read-ahead ------------------------------------------------------------------


@pytest.mark.mount
@pytest.mark.skipif(os.getuid() != 0, reason="raising the kernel's read-ahead needs root")
def test_kernel_read_ahead_holds_after_init_and_is_reported(emu: Emulator, work: Path) -> None:
    with mounted(work, emu, '[kernel]\nread_ahead = "4MiB"\n') as m:
        deadline = time.monotonic() + 20
        while stats_of(m.path)["kernel"]["read_ahead_kb"] is None:
            assert time.monotonic() < deadline, "read-ahead never reported"
            time.sleep(0.05)
        assert stats_of(m.path)["kernel"]["read_ahead_kb"] == 4096
        entry = mount_entry(str(m.path))
        assert entry is not None and entry.is_fuse
        bdi = Path(f"/sys/class/bdi/{entry.device}/read_ahead_kb")
        assert int(bdi.read_text()) == 4096


# -- plain HTTP -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST.", True),
        ("emu.localhost", True),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
        ("127.0.0.1.nip.io", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def loopback_name() -> str | None:
    """A host name that is not spelt as loopback but reaches the emulator here."""
    name = socket.gethostname()
    try:
        return name if socket.gethostbyname(name) == "127.0.0.1" else None
    except OSError:
        return None


@pytest.mark.mount
def test_plain_http_to_another_host_is_warned_once(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        assert "plain http://" not in m.log_text()  # the emulator on loopback: quiet
    name = loopback_name()
    if name is None:
        pytest.skip("this machine's host name does not resolve to 127.0.0.1")
    port = emu.url.rsplit(":", 1)[1]
    cfg = work / "named.toml"
    cfg.write_text(
        f'[enos]\ngateway = "{emu.url}"\nintegration = "http://{name}:{port}"\n'
        f'app_key = "{emu.app_key}"\n\n[[org]]\nid = "{emu.org}"\n'
    )
    mnt = work / "named"
    mnt.mkdir()
    log = work / "named.log"
    out = enosfs("mount", "--config", cfg, "--log-file", log, mnt, env=secret_env(emu.app_secret))
    try:
        assert out.returncode == 0, out.stderr
        assert (mnt / emu.org / CSV).read_bytes() == emu.blob(demo_files(emu)[CSV])
    finally:
        done = enosfs("umount", mnt)
    assert done.returncode == 0
    warnings = [ln for ln in log.read_text().splitlines() if "plain http://" in ln]
    assert len(warnings) == 1 and f"to {name}:" in warnings[0], warnings
    assert "WARNING" in warnings[0]


# -- the integration host ---------------------------------------------------------------


@pytest.mark.mount
def test_an_untrusted_certificate_on_the_integration_host_stops_the_mount(
    demo_emu: Emulator, work: Path
) -> None:
    cert, key = make_cert(work)
    with emulator(
        demo_emu.data_dir, "demo", "--tls-cert", str(cert), "--tls-key", str(key)
    ) as files:
        assert files.url.startswith("https://")
        cfg = work / "c.toml"
        cfg.write_text(
            f'[enos]\ngateway = "{demo_emu.url}"\nintegration = "{files.url}"\n'
            f'app_key = "{demo_emu.app_key}"\n\n[[org]]\nid = "{demo_emu.org}"\n'
        )
        mnt = work / "mnt"
        mnt.mkdir()
        env = secret_env(demo_emu.app_secret)
        try:
            # In the background first: were it to mount, it would come back.
            for args in ([], ["-f"]):
                out = enosfs("mount", *args, "--config", cfg, mnt, env=env, timeout=60)
                assert out.returncode == 1, out
                lines = out.stderr.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("enosfs: "), out.stderr
                assert "integration host" in lines[0] and "certificate" in lines[0].lower()
                assert not is_mounted(mnt)
        finally:
            if is_mounted(mnt):
                enosfs("umount", mnt)


# -- an ordinary user -------------------------------------------------------------------

TEST_USER = "enosfs-test"
PROBE = "import enosfs, pyfuse3, trio, httpx"


def as_user(
    pw: pwd.struct_passwd, *cmd: str | Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {"HOME": pw.pw_dir, "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(
        [str(c) for c in cmd],
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=[],
        env={**base, **(env or {})},
        cwd=pw.pw_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def runs_enosfs(pw: pwd.struct_passwd, python: str | Path) -> bool:
    try:
        return as_user(pw, python, "-c", PROBE).returncode == 0
    except OSError:  # not even executable for this user
        return False


def python_for(pw: pwd.struct_passwd, where: Path) -> str:
    """An interpreter this user can run that imports enosfs and its dependencies.

    This one, if the user can reach it. Often they cannot (a pyenv under /root, which
    others may not enter): then a same-version interpreter they can run, in a thin venv
    whose .pth adds this environment's site-packages (where the editable install of
    enosfs is). Nothing is copied and no permission outside `where` changes."""
    if runs_enosfs(pw, sys.executable):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = sysconfig.get_paths()["purelib"]
    candidates = [shutil.which(version), f"/usr/bin/{version}", f"/usr/local/bin/{version}"]
    for n, candidate in enumerate(dict.fromkeys(c for c in candidates if c)):
        venv = where / f"venv{n}"
        try:
            if as_user(pw, candidate, "-m", "venv", "--without-pip", venv).returncode != 0:
                continue
        except OSError:
            continue
        pth = venv / "lib" / version / "site-packages" / "enosfs-under-test.pth"
        pth.write_text(f"import site; site.addsitedir({site_packages!r})\n")
        python = venv / "bin" / "python"
        if runs_enosfs(pw, python):
            return str(python)
    pytest.fail(f"no {version} that user {pw.pw_name} can run imports enosfs")


@contextmanager
def ordinary_user() -> Iterator[pwd.struct_passwd]:
    """TEST_USER, created (and afterwards removed) unless it exists."""
    created = False
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True,
            capture_output=True,
            timeout=60,
        )
        created = True
        pw = pwd.getpwnam(TEST_USER)
    try:
        yield pw
    finally:
        if created:
            subprocess.run(
                ["userdel", "--remove", TEST_USER], check=False, capture_output=True, timeout=60
            )


@contextmanager
def fuse_device_open_to_users() -> Iterator[None]:
    """/dev/fuse as every distribution's udev rule leaves it (0666): fusermount3 opens
    it as the calling user. Containers often have it 0600, root only; the mode is put
    back afterwards."""
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o666 == 0o666:
        yield
        return
    os.chmod("/dev/fuse", mode | 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@pytest.mark.mount
@pytest.mark.skipif(os.getuid() != 0, reason="creating a user needs root")
def test_an_ordinary_user_mounts_reads_verifies_and_unmounts(emu: Emulator) -> None:
    with ordinary_user() as pw, fuse_device_open_to_users():
        home = Path(pw.pw_dir)
        home.mkdir(parents=True, exist_ok=True)  # a user that existed may have none
        where = Path(tempfile.mkdtemp(prefix="enosfs-test-", dir=home))
        os.chown(where, pw.pw_uid, pw.pw_gid)
        mnt, cache, log = where / "mnt", where / "cache", where / "mount.log"
        pid = None
        try:
            python = python_for(pw, where)
            assert as_user(pw, "mkdir", mnt).returncode == 0
            cfg = write_config(where / "enosfs.toml", emu)
            out = as_user(
                pw,
                python,
                "-m",
                "enosfs",
                "mount",
                "--config",
                cfg,
                "--cache-dir",
                cache,
                "--log-file",
                log,
                mnt,
                env={SECRET_ENV: emu.app_secret},
            )
            assert out.returncode == 0, out.stderr
            pid = int(out.stdout.split("(pid ")[1].split(")")[0])
            assert Path(f"/proc/{pid}").stat().st_uid == pw.pw_uid
            files, blobs = demo_files(emu), emu.blobs()
            got = as_user(pw, "md5sum", mnt / emu.org / CSV)
            assert got.returncode == 0, got.stderr
            assert got.stdout.split()[0] == blobs[files[CSV]]["md5"]
            deadline = time.monotonic() + 20  # the disk cache writes in the background
            while True:
                st = as_user(pw, python, "-m", "enosfs", "stats", "--json", mnt)
                assert st.returncode == 0, st.stderr
                doc = json.loads(st.stdout)
                if doc["cache"]["disk"]["writes"] > 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert doc["cache"]["disk"]["dir"] == str(cache)
            assert doc["cache"]["disk"]["writes"] > 0
            assert isinstance(doc["kernel"]["read_ahead_kb"], int)  # the kernel's own
            assert any(cache.rglob("*")) and cache.stat().st_uid == pw.pw_uid
            ver = as_user(pw, python, "-m", "enosfs", "verify", mnt / emu.org / "WTG-002")
            assert ver.returncode == 0, ver.stdout + ver.stderr
            done = as_user(pw, python, "-m", "enosfs", "umount", mnt)
            assert done.returncode == 0, done.stderr
            assert not is_mounted(mnt)
            wait_gone(pid)
            text = log.read_text()
            assert "Traceback" not in text and " ERROR " not in text, text
        finally:
            if is_mounted(mnt):
                subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)
            if pid is not None and Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(where, ignore_errors=True)
