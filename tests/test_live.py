"""Living with a mount: the disk cache, integrity checks, visible state, and mounting
the way Linux mounts things (-o options, mount -t fuse.enosfs, fstab-style helpers)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import httpx
import pytest

from enosfs.config import settings_from_dict
from enosfs.diskcache import LAYOUT
from enosfs.errors import ConfigError
from enosfs.options import parse_options
from tests.slow_disk import python_path
from tests.support import (
    Emulator,
    background_mount,
    demo_files,
    enosfs,
    free_port,
    is_mounted,
    known,
    md5,
    mounted,
    run,
    secret_env,
    stats_of,
    wait_for,
    write_config,
)

CSV = "WTG-002/feature/scada_export.csv"
BIG = "WTG-001/feature/vibration_raw.bin"


# -- the disk cache ---------------------------------------------------------------------


@pytest.mark.mount
def test_disk_cache_survives_a_remount_with_no_downloads(emu: Emulator, work: Path) -> None:
    files = demo_files(emu)
    blobs = emu.blobs()
    cache = work / "cache"
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        for rel in files:
            assert md5(m.org / rel) == blobs[files[rel]]["md5"], rel
        # The writes finish in the background; a large file's blocks are kept once
        # its whole reading matched (staged until then). A file shown under two names
        # is one file: its blocks are counted once.
        want = sum(-(-blobs[uri]["size"] // (1024 * 1024)) for uri in set(files.values()))
        wait_for(lambda: on_disk(m.path, want), f"{want} blocks on disk")
    emu.reset_stats()
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        for rel in files:
            assert md5(m.org / rel) == blobs[files[rel]]["md5"], rel
        disk = stats_of(m.path)["cache"]["disk"]
        assert disk["hits"] > 200 and disk["misses"] == 0
    stats = emu.stats()
    assert stats.get("files.download", 0) == 0
    assert stats.get("files.download.bytes", 0) == 0


def on_disk(mountpoint: Path, blocks: int) -> bool:
    """Are this many blocks in the mount's disk cache, and none waiting for its file's
    check?"""
    disk = stats_of(mountpoint)["cache"]["disk"]
    return bool(disk["blocks"] >= blocks and disk["staged"] == 0)


@pytest.mark.mount
def test_blocks_read_just_before_an_unmount_are_on_disk_at_the_next_mount(
    emu: Emulator, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unmount waits for the disk cache's writes under way, rather than cancelling
    them: here each write takes two seconds (a slow disk), and the next mount serves the
    file from disk while the server fails every download."""
    uri = demo_files(emu)[CSV]
    cache = work / "cache"
    with monkeypatch.context() as slow:
        slow.setenv("PYTHONPATH", python_path(work / "slow-disk", seconds=2.0))
        with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
            assert (m.org / CSV).read_bytes() == emu.blob(uri)
            assert stats_of(m.path)["cache"]["disk"]["writes"] == 0  # still under way
    assert "dropped at unmount" not in m.log_text()
    emu.faults({"kind": "error", "status": 503, "match": "files.download"})
    emu.reset_stats()
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        assert (m.org / CSV).read_bytes() == emu.blob(uri)
        disk = stats_of(m.path)["cache"]["disk"]
        assert disk["hits"] == 1 and disk["misses"] == 0
    assert emu.stats().get("files.download", 0) == 0


@pytest.mark.mount
def test_a_damaged_cache_block_is_fetched_again(emu: Emulator, work: Path) -> None:
    uri = demo_files(emu)[CSV]
    cache = work / "cache"
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        assert (m.org / CSV).read_bytes() == emu.blob(uri)
        wait_for(lambda: on_disk(m.path, 1), "the block on disk")
    blocks = [p for p in cache.rglob("*") if p.is_file() and p.parent.parent.name == "v1"]
    assert len(blocks) == 1
    data = bytearray(blocks[0].read_bytes())
    data[-10] ^= 0xFF  # one flipped bit in the payload: the CRC must catch it
    blocks[0].write_bytes(bytes(data))
    emu.reset_stats()
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        assert (m.org / CSV).read_bytes() == emu.blob(uri)
        assert stats_of(m.path)["cache"]["disk"]["corrupt_dropped"] == 1
    assert emu.stats()["files.download"] == 1


@pytest.mark.mount
def test_a_truncated_cache_block_is_fetched_again(emu: Emulator, work: Path) -> None:
    uri = demo_files(emu)[CSV]
    cache = work / "cache"
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        (m.org / CSV).read_bytes()
        wait_for(lambda: on_disk(m.path, 1), "the block on disk")
    block = next(p for p in cache.rglob("*") if p.is_file() and p.parent.parent.name == "v1")
    block.write_bytes(block.read_bytes()[:1000])  # a write torn by a crash
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        assert (m.org / CSV).read_bytes() == emu.blob(uri)


@pytest.mark.mount
def test_a_second_mount_on_a_cache_dir_in_use_fails_clearly(emu: Emulator, work: Path) -> None:
    cache = work / "cache"
    with mounted(work, emu, "", "--cache-dir", str(cache)) as m:
        other = work / "other"
        other.mkdir()
        cfg = write_config(work / "c2.toml", emu)
        for args in (["-f"], []):
            out = enosfs(
                "mount",
                *args,
                "--config",
                cfg,
                "--cache-dir",
                cache,
                other,
                env=secret_env(emu.app_secret),
                timeout=60,
            )
            assert out.returncode == 1
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and "in use by another enosfs mount" in lines[0]
            assert f"pid {m.proc.pid}" in lines[0]
            assert not is_mounted(other)


@pytest.mark.mount
def test_the_disk_cache_stays_within_its_size(emu: Emulator, work: Path) -> None:
    cache = work / "cache"
    with mounted(work, emu, "", "--cache-dir", str(cache), "--cache-size", "8MiB") as m:
        assert md5(m.org / BIG) == emu.blobs()[demo_files(emu)[BIG]]["md5"]
        # More than fits was read: the writes evict older blocks as they land.
        wait_for(lambda: stats_of(m.path)["cache"]["disk"]["evictions"] > 0, "an eviction")
        assert stats_of(m.path)["cache"]["disk"]["bytes"] <= 8 * 1024 * 1024
    # The blocks' folder; the metadata store beside it is not counted in the cache size.
    on_disk = sum(p.stat().st_size for p in (cache / LAYOUT).rglob("*") if p.is_file())
    assert on_disk <= 8 * 1024 * 1024 + 4096


# -- integrity --------------------------------------------------------------------------


@pytest.mark.mount
def test_a_small_file_with_wrong_bytes_is_eio_never_served(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        known(m.org / CSV)
        emu.faults({"kind": "corrupt", "after": 1234, "match": "files.download"})
        with pytest.raises(OSError) as info:
            (m.org / CSV).read_bytes()
        assert info.value.errno == errno.EIO
        assert "do not match the md5" in m.log_text()
        emu.admin("DELETE", "faults")
        # The failure is remembered for a second (blocks.FAILURE_MEMORY), then the file
        # is fetched again, and its bytes match.
        want = emu.blob(demo_files(emu)[CSV])
        wait_for(lambda: read_or_none(m.org / CSV) == want, "the good bytes")


@pytest.mark.mount
def test_verify_exit_codes(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        folder = m.org / "WTG-001"
        out = enosfs("verify", folder, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "0 mismatched" in out.stdout and "OK" in out.stdout
        assert "without a digest" in out.stdout
        # Corrupt the bytes the large file is served with: the mount, which checked the
        # file whole above, now checks each block of it and refuses the bad one, and
        # verify reports the file it cannot read.
        emu.faults({"kind": "corrupt", "after": 5000, "match": "files.download"})
        with open(m.org / BIG, "rb") as f:  # out of the kernel's cache: reads reach us
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        out = enosfs("verify", m.org / BIG, timeout=300)
        assert out.returncode == 1
        assert "ERROR" in out.stdout and "1 unreadable" in out.stdout and "0 ok" in out.stdout
        assert "did not match the file's checked bytes" in m.log_text()
    out = enosfs("verify", work / "nothing-here")
    assert out.returncode == 1 and "no such file" in out.stderr


@pytest.mark.mount
def test_getfattr_tells_where_a_file_came_from(emu: Emulator, work: Path) -> None:
    uri = demo_files(emu)[CSV]
    blob = emu.blobs()[uri]
    with mounted(work, emu) as m:
        out = run("getfattr", "-d", m.org / CSV)
        assert out.returncode == 0, out.stderr
        attrs = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        assert attrs["user.enos.uri"] == f'"{uri}"'
        assert attrs["user.enos.md5"] == f'"{blob["md5"]}"'
        assert attrs["user.enos.asset"] == '"WTG-002"'
        assert attrs["user.enos.category"] == '"feature"'
        assert attrs["user.enos.sign_method"] == '"md5"'
        assert attrs["user.enos.original_name"] == f'"{blob["original_name"]}"'
        assert attrs["user.enos.created"] == f'"{blob["create_time_ms"]}"'


# -- visible state ----------------------------------------------------------------------


@pytest.mark.mount
def test_stats_move_as_reads_happen(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        assert sorted(os.listdir(m.path / ".enosfs")) == ["config", "control", "stats", "version"]
        known(m.org / CSV)  # read as a listed file: its download is a files.download
        before = stats_of(m.path)
        (m.org / CSV).read_bytes()
        after = stats_of(m.path)
        assert after["bytes_downloaded"] > before["bytes_downloaded"]
        assert after["requests"]["files.download"] > before["requests"].get("files.download", 0)
        assert after["kernel"]["reads"] > before["kernel"]["reads"]
        assert 0 < after["token"]["expires_in_s"] <= 7200
        with pytest.raises(OSError):
            (m.org / "WTG-001/feature/nope").read_bytes()
        assert stats_of(m.path)["errors"]["ENOENT"] >= 1
        config = json.loads((m.path / ".enosfs/config").read_bytes())
        assert config["app_secret"] == "***" and config["gateway"] == emu.url
        assert emu.app_secret not in (m.path / ".enosfs/config").read_text()
        assert (m.path / ".enosfs/version").read_text().startswith("enosfs ")
        with pytest.raises(OSError) as info:
            (m.path / ".enosfs/stats").write_text("x")
        assert info.value.errno == errno.EROFS


@pytest.mark.mount
def test_enosfs_stats_command(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        (m.org / CSV).read_bytes()
        out = enosfs("stats", m.path)
        assert out.returncode == 0
        assert "hit ratio" in out.stdout and "downloaded" in out.stdout
        out = enosfs(
            "stats",
            m.path,
            "--watch",
            "--count",
            "3",
            "--interval",
            "0.2",
            timeout=30,
        )
        assert out.returncode == 0 and len(out.stdout.strip().splitlines()) == 3
        out = enosfs("stats", m.path, "--json")
        assert json.loads(out.stdout)["mountpoint"] == str(m.path)
    out = enosfs("stats", work)
    assert out.returncode == 1 and "not an enosfs mount" in out.stderr


@pytest.mark.mount
def test_prometheus_metrics_and_json_logs(emu: Emulator, work: Path) -> None:
    port = free_port()
    with mounted(work, emu, "", "--metrics-addr", f"127.0.0.1:{port}", "--log-format", "json") as m:
        known(m.org / CSV)  # read as a listed file: its download is a files.download
        (m.org / CSV).read_bytes()
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert 'enosfs_requests_total{kind="files.download"}' in text
        assert "enosfs_cache_hits_total" in text
        lines = m.log_text().splitlines()
        docs = [json.loads(line) for line in lines]
        assert any("mounted" in d["message"] and "memory cache" in d["message"] for d in docs)


def read_or_none(path: Path) -> bytes | None:
    """The file's bytes, or None where reading it fails."""
    try:
        return path.read_bytes()
    except OSError:
        return None


# -- mounting like a native filesystem --------------------------------------------------


def test_o_options() -> None:
    opts = parse_options(
        [
            "ro,allow_other,cache_dir=/var/cache/x,cache_size=2G,_netdev",
            "nofail,noauto,x-systemd.automount,memory=64MiB,metadata_ttl=5s",
        ]
    )
    assert opts.settings == {
        "allow_other": True,
        "cache_dir": "/var/cache/x",
        "disk_size": 2_000_000_000,
        "cache_memory": 64 * 1024 * 1024,
        "metadata_ttl": 5.0,
    }
    base = settings_from_dict(
        {"enos": {"gateway": "http://x", "app_key": "k"}, "org": [{"id": "o"}]},
        {"ENOSFS_APP_SECRET": "s"},
    )
    s = opts.apply(base)
    assert s.allow_other and s.cache_memory == 64 * 1024 * 1024 and s.read_ahead == 16 << 20
    for bad, message in (
        ("colour=blue", "unknown mount option 'colour'"),
        ("cache_size", "needs a value"),
        ("block_size=3k", "power of two"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_options([bad]).apply(base)


@pytest.mark.mount
def test_mount_t_fuse_enosfs_through_the_helper(emu: Emulator, work: Path) -> None:
    helper = Path("/sbin/mount.fuse.enosfs")
    ours = shutil.which("mount.fuse.enosfs", path=os.path.dirname(sys.executable))
    assert ours, "the mount.fuse.enosfs entry point is not installed"
    made = False
    if not helper.exists():
        if os.geteuid() != 0:
            pytest.fail("this test needs root to link /sbin/mount.fuse.enosfs")
        helper.symlink_to(ours)
        made = True
    try:
        mnt = work / "native"
        mnt.mkdir()
        cfg = write_config(work / "c.toml", emu)
        out = run(
            "mount",
            "-t",
            "fuse.enosfs",
            cfg,
            mnt,
            "-o",
            "_netdev,nofail,allow_other,memory=64MiB",
            env=secret_env(emu.app_secret),
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        try:
            assert is_mounted(mnt)
            line = next(
                ln
                for ln in Path("/proc/mounts").read_text().splitlines()
                if ln.split()[1] == str(mnt)
            )
            assert line.split()[2] == "fuse.enosfs" and "allow_other" in line
            assert (mnt / emu.org / "WTG-001").is_dir()
        finally:
            done = run("umount", mnt)
        assert done.returncode == 0, done.stderr
        assert not is_mounted(mnt)
    finally:
        if made:
            helper.unlink()


@pytest.mark.mount
def test_a_dead_mount_is_cleaned_by_the_next_mount(emu: Emulator, work: Path) -> None:
    mnt = work / "mnt"
    mnt.mkdir()
    cfg = write_config(work / "c.toml", emu)
    out, pid = background_mount(cfg, mnt, emu)
    assert out.returncode == 0 and pid, out.stderr
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the killed mount to end", timeout=10)
    with pytest.raises(OSError) as info:
        os.listdir(mnt)
    assert info.value.errno == errno.ENOTCONN
    try:
        out, _ = background_mount(cfg, mnt, emu)
        assert out.returncode == 0, out.stderr
        assert "dead FUSE mount" in out.stderr and "cleaned it up" in out.stderr
        assert (mnt / emu.org).is_dir()
    finally:
        enosfs("umount", mnt)
    assert not is_mounted(mnt)
