"""Layer 6: faults. Real mounts against an emulator told to misbehave: correct bytes or
a prompt, fitting error; never wrong bytes, never a hang; a clean unmount after."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from enosfs.naming import uri_id
from tests.support import (
    Emulator,
    demo_files,
    emulator,
    enosfs,
    free_port,
    is_mounted,
    known,
    md5,
    mounted,
    run,
    secret_env,
    write_config,
)

pytestmark = pytest.mark.mount

BIG = "WTG-001/feature/vibration_raw.bin"
CSV = "WTG-002/feature/scada_export.csv"
FAST = '[network]\ntimeout = "2s"\n'  # every fault test has a short deadline


def read_range(path: Path, off: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def errno_of_read(path: Path, off: int = 0, n: int = 4096) -> int:
    with pytest.raises(OSError) as info:
        read_range(path, off, n)
    return int(info.value.errno or 0)


# -- slow and failing servers ---------------------------------------------------------


def test_latency_beyond_the_deadline_is_a_prompt_error_then_recovers(
    emu: Emulator, work: Path
) -> None:
    with mounted(work, emu, FAST) as m:
        path = m.org / BIG
        path.stat()
        emu.faults({"kind": "latency", "match": "files.download", "seconds": 6})
        start = time.monotonic()
        code = errno_of_read(path, 50 << 20)
        took = time.monotonic() - start
        assert code in (errno.ETIMEDOUT, errno.EIO)
        assert took < 2 + 1 + 1, f"a read blocked {took:.1f}s"
        emu.admin("DELETE", "faults")
        time.sleep(1.1)  # a block that just failed fails fast for a second
        want = emu.blob(demo_files(emu)[BIG])
        assert read_range(path, 50 << 20, 4096) == want[50 << 20 : (50 << 20) + 4096]
        assert is_mounted(m.path)


def test_a_slow_trickle_is_not_a_timeout(emu: Emulator, work: Path) -> None:
    """The deadline bounds each call, not a whole download: 3 MiB at 1 MB/s takes three
    seconds, more than the 2 s deadline, and arrives whole, each read in time."""
    rel = "WTG-001/ota/turbine-controller-4.1.0.bin"
    uri = demo_files(emu)[rel]
    with mounted(work, emu, FAST) as m:
        (m.org / rel).stat()
        emu.faults({"kind": "bandwidth", "match": "files.download", "rate": 1_000_000})
        start = time.monotonic()
        data = (m.org / rel).read_bytes()
        assert data == emu.blob(uri)
        assert time.monotonic() - start >= len(data) / 1_000_000 * 0.8


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_retried(emu: Emulator, work: Path, status: int) -> None:
    files = demo_files(emu)
    with mounted(work, emu, FAST) as m:
        # One call gets about six tries within the 2 s deadline: at 0.5 a call fails
        # outright once in 64, and a folder's sizing makes several calls.
        emu.faults({"kind": "error", "status": status, "share": 0.3})
        for rel in ("WTG-003/feature/model_file.json", "INV-101/feature/daily_yield.csv", CSV):
            assert (m.org / rel).read_bytes() == emu.blob(files[rel])
        assert emu.fired().get("error", 0) > 0


def test_429_waits_as_long_as_retry_after_says(emu: Emulator, work: Path) -> None:
    uri = demo_files(emu)[CSV]
    with mounted(work, emu, '[network]\ntimeout = "5s"\n') as m:
        known(m.org / CSV)
        emu.faults(
            {"kind": "error", "status": 429, "seconds": 1.5, "times": 1, "match": "files.download"}
        )
        start = time.monotonic()
        assert (m.org / CSV).read_bytes() == emu.blob(uri)
        assert time.monotonic() - start >= 1.4
        assert emu.fired()["error"] == 1


def test_a_server_that_never_recovers_gives_eio_in_time(emu: Emulator, work: Path) -> None:
    with mounted(work, emu, FAST) as m:
        (m.org / BIG).stat()
        emu.faults({"kind": "error", "status": 503, "match": "files.download"})
        start = time.monotonic()
        assert errno_of_read(m.org / BIG, 77 << 20) in (errno.EIO, errno.ETIMEDOUT)
        assert time.monotonic() - start < 2 + 1 + 1


# -- bodies cut, stalled, short ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["reset", "short"])
def test_a_cut_body_resumes_from_the_byte_it_reached(emu: Emulator, work: Path, kind: str) -> None:
    uri = demo_files(emu)[BIG]
    with mounted(work, emu, FAST) as m:
        (m.org / BIG).stat()
        emu.reset_stats()
        emu.faults({"kind": kind, "after": 300_000, "times": 3, "match": "files.download"})
        assert md5(m.org / BIG) == emu.blobs()[uri]["md5"]
        stats = emu.stats()
        assert stats["faults.cut"] == 3
        # Resumed, not restarted: the bytes sent are the file plus less than what the
        # three cut requests delivered.
        size = emu.blobs()[uri]["size"]
        assert stats["files.download.bytes"] < size + 3 * 300_000 + 1


def test_a_body_cut_every_time_is_eio_never_short_data(emu: Emulator, work: Path) -> None:
    with mounted(work, emu, FAST) as m:
        (m.org / BIG).stat()
        # Cut before a single byte: no progress is ever made.
        emu.faults({"kind": "reset", "after": 0, "match": "files.download"})
        start = time.monotonic()
        assert errno_of_read(m.org / BIG, 10 << 20, 1 << 20) == errno.EIO
        assert time.monotonic() - start < 2 + 1 + 1


def test_a_stalled_body_is_abandoned_and_resumed(emu: Emulator, work: Path) -> None:
    uri = demo_files(emu)[CSV]
    with mounted(work, emu, FAST) as m:
        known(m.org / CSV)
        emu.faults(
            {"kind": "stall", "after": 10_000, "seconds": 30, "times": 1, "match": "files.download"}
        )
        start = time.monotonic()
        assert (m.org / CSV).read_bytes() == emu.blob(uri)
        took = time.monotonic() - start
        assert 1.5 < took < 2 + 1 + 1, f"took {took:.1f}s"


def test_server_ignoring_range_still_gives_correct_bytes(emu: Emulator, work: Path) -> None:
    files = demo_files(emu)
    want = emu.blob(files[BIG])
    emu.switches(honour_range=False)
    with mounted(work, emu) as m:
        rnd = random.Random(4)
        for _ in range(20):
            off = rnd.randrange(len(want) - 100_000)
            assert read_range(m.org / BIG, off, 100_000) == want[off : off + 100_000]
        assert md5(m.org / CSV) == emu.blobs()[files[CSV]]["md5"]


# -- envelopes are never content -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "want"),
    [
        # 99500 is retried until the deadline: then EIO, or ETIMEDOUT if the deadline
        # struck during an attempt.
        (200, 99500, {errno.EIO, errno.ETIMEDOUT}),
        (500, 99500, {errno.EIO, errno.ETIMEDOUT}),
        (200, 99404, {errno.ENOENT}),
        (404, 99404, {errno.ENOENT}),
        (200, 99403, {errno.EACCES}),
        (400, 99400, {errno.EIO}),
    ],
)
def test_an_error_envelope_is_never_served_as_content(
    emu: Emulator, work: Path, status: int, code: int, want: set[int]
) -> None:
    with mounted(work, emu, FAST) as m:
        path = m.org / "WTG-001/feature/model_file.json"
        known(path)
        emu.faults({"kind": "envelope", "status": status, "code": code, "match": "files.download"})
        start = time.monotonic()
        assert errno_of_read(path) in want
        assert time.monotonic() - start < 2 + 1 + 1


# -- tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["gateway", "envelope", "apim"])
def test_a_revoked_token_is_renewed_once(emu: Emulator, work: Path, style: str) -> None:
    files = demo_files(emu)
    emu.switches(token_rejection=style)
    with mounted(work, emu) as m:
        (m.org / "WTG-001/feature").is_dir()
        emu.admin("POST", "tokens/revoke")
        emu.reset_stats()
        for rel in ("WTG-002/feature/model_file.json", "WTG-003/feature/model_file.json"):
            assert (m.org / rel).read_bytes() == emu.blob(files[rel])
        stats = emu.stats()
        assert stats["auth.rejected"] >= 1
        assert stats.get("token.get", 0) + stats.get("token.refresh", 0) <= 2


def test_credentials_rotated_away_give_eacces_and_one_log_line(emu: Emulator, work: Path) -> None:
    with mounted(work, emu, FAST) as m:
        (m.org / "WTG-001/feature").is_dir()
        emu.admin("POST", "apps", {"appKey": emu.app_key, "appSecret": "new-secret-7f3a"})
        try:
            emu.admin("POST", "tokens/revoke")
            emu.reset_stats()
            codes = [
                errno_of_read(m.org / f"WTG-00{i}/feature/nameplate_photo.png") for i in (1, 2, 3)
            ]
            time.sleep(1)
            stats = emu.stats()
        finally:
            emu.admin("POST", "apps", {"appKey": emu.app_key, "appSecret": emu.app_secret})
        assert codes == [errno.EACCES] * 3
        # Refused once, then quiet: no loop of token requests.
        assert stats.get("token.get", 0) + stats.get("token.refresh", 0) <= 3
        lines = [ln for ln in m.log_text().splitlines() if "refused" in ln and "ERROR" in ln]
        assert len(lines) == 1, lines
        assert "new-secret-7f3a" not in m.log_text() and emu.app_secret not in m.log_text()


# -- metadata APIs --------------------------------------------------------------------


def test_older_enos_without_getfileinfo(emu: Emulator, work: Path) -> None:
    files = demo_files(emu)
    blobs = emu.blobs()
    emu.switches(file_info=False)
    with mounted(work, emu) as m:
        for rel, uri in files.items():
            assert (m.org / rel).stat().st_size == blobs[uri]["size"], rel
        assert md5(m.org / CSV) == blobs[files[CSV]]["md5"]
        assert emu.stats()["files.getFileInfo"] == 1


def test_listing_denied_keeps_configured_assets_and_files(emu: Emulator, work: Path) -> None:
    files = demo_files(emu)
    uri = files["INV-102/feature/datasheet.json"]
    emu.faults({"kind": "deny", "match": "devices.search"})
    extra = (
        f'[[file]]\norg = "{emu.org}"\nasset = "INV-102"\nuri = "{uri}"\n'
        'name = "datasheet-from-config.json"\n'
    )
    with mounted(work, emu, extra) as m:
        assert sorted(os.listdir(m.org)) == ["INV-102"]
        assert (m.org / "INV-102/feature/datasheet-from-config.json").read_bytes() == emu.blob(uri)
        # The asset can still be named, and its folder filled from the other APIs.
        assert (m.org / "WTG-002/feature/model_file.json").stat().st_size > 0
        os.listdir(m.org)
        said = [ln for ln in m.log_text().splitlines() if "not permitted" in ln]
        assert len(said) == 1, said


@pytest.mark.parametrize("kind", ["garbage", "nodata"])
def test_malformed_answers_are_errors_not_crashes(emu: Emulator, work: Path, kind: str) -> None:
    # The devices the mount's own check found serve its first listing while they are
    # fresh: once they are not, that listing searches, and gets the bad answer.
    with mounted(work, emu, FAST + '[cache]\nmetadata_ttl = "1s"\n') as m:
        emu.faults({"kind": kind, "match": "devices.*"})
        time.sleep(1.1)
        start = time.monotonic()
        with pytest.raises(OSError) as info:
            os.listdir(m.org)
        assert info.value.errno == errno.EIO
        assert time.monotonic() - start < 2 + 1 + 1
        emu.admin("DELETE", "faults")
        time.sleep(0.1)
        assert "WTG-001" in os.listdir(m.org)
        assert m.proc.poll() is None


# -- the backend goes away and comes back ----------------------------------------------


def test_backend_down_then_back(demo_emu: Emulator, work: Path) -> None:
    port = free_port()
    args = ("--port", str(port))
    with emulator(demo_emu.data_dir, "demo", *args) as emu:
        files = demo_files(emu)
        want = emu.blob(files[BIG])
        config = FAST + '[cache]\nmetadata_ttl = "1s"\n'
        with mounted(work, emu, config) as m:
            listed = sorted(os.listdir(m.org / "WTG-001/feature"))
            assert read_range(m.org / BIG, 0, 4096) == want[:4096]
            emu.proc.terminate()
            emu.proc.wait(timeout=10)
            time.sleep(1.2)  # past the metadata TTL: listings want refreshing
            start = time.monotonic()
            assert errno_of_read(m.org / BIG, 100 << 20) in (errno.EIO, errno.ETIMEDOUT)
            assert time.monotonic() - start < 2 + 1 + 1
            # What was listed is still listed.
            assert sorted(os.listdir(m.org / "WTG-001/feature")) == listed
            assert (m.org / BIG).stat().st_size == len(want)
            with emulator(demo_emu.data_dir, "demo", *args):
                deadline = time.monotonic() + 20
                while True:
                    try:
                        got = read_range(m.org / BIG, 100 << 20, 4096)
                        break
                    except OSError:
                        assert time.monotonic() < deadline, "the mount did not recover"
                        time.sleep(0.2)
                assert got == want[100 << 20 : (100 << 20) + 4096]
            assert m.proc.poll() is None


# -- files that change ------------------------------------------------------------------


def test_a_replaced_file_never_mixes_versions(
    emu: Emulator, work: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Same fileUri, same size, new bytes: a handle opened before keeps its version or
    fails with ESTALE; a new open sees only the new version."""
    with emulator(
        tmp_path_factory.mktemp("replace-data"), "demo", "--demo-large-size", "8MiB"
    ) as emu2:
        files = demo_files(emu2)
        rel = "WTG-001/feature/vibration_raw.bin"
        old = emu2.blob(files[rel])
        config = (
            '[cache]\nmetadata_ttl = "1s"\n[kernel]\nattr_timeout = "1s"\nentry_timeout = "1s"\n'
        )
        with mounted(work, emu2, config) as m:
            path = m.org / rel
            with open(path, "rb", buffering=0) as f:
                assert f.read(1 << 20) == old[: 1 << 20]
                emu2.replace_feature(
                    "WTG-001", "vibration_raw", bytes=len(old), seed="v2", keep_uri=True
                )
                new = emu2.blob(files[rel])
                assert new != old and len(new) == len(old)
                f.seek(6 << 20)
                try:
                    got = f.read(1 << 20)
                except OSError as exc:
                    assert exc.errno == errno.ESTALE
                else:
                    assert got == old[6 << 20 : 7 << 20], "a handle mixed two versions"
            time.sleep(1.2)
            assert md5(path) == hashlib.md5(new).hexdigest()
            # A new fileUri under the same feature: the name now shows the new file.
            emu2.replace_feature("WTG-001", "vibration_raw", text="third version\n", name="v3.bin")
            time.sleep(1.2)
            assert path.read_bytes() == b"third version\n"


# -- bad input --------------------------------------------------------------------------


# md5 of (4 GiB + 12345) zero bytes, so the emulator need not hash them each run.
ZEROS_MD5 = "24a4e75cb0fcd18faf95d73aa0995a65"


def hostile_seed(tmp: Path, assets: int = 3) -> Path:
    long_id = "x" * 300
    seed = {
        "apps": [{"appKey": "k", "appSecret": "s3cr3t-value"}],
        "orgs": [
            {
                "orgId": "o1",
                "models": [
                    {
                        "modelId": "m",
                        "attributes": {
                            "../../etc/passwd": "FILE",
                            "a/b": "FILE",
                            "..": "FILE",
                            long_id: "FILE",
                            "tab\there": "FILE",
                            "温度/曲线": "FILE",
                            "dup": "FILE",
                            "big": "FILE",
                            "empty": "FILE",
                            "nul\u0000byte": "FILE",
                        },
                        "measurepoints": {"dup": "FILE"},
                    }
                ],
                "products": [{"productKey": "p", "modelId": "m"}],
                "devices": [
                    {
                        "assetId": "../escape" if i == 0 else f"a{i:05d}",
                        "productKey": "p",
                        "attributes": {
                            "../../etc/passwd": {"text": "one"},
                            "a/b": {"text": "two"},
                            "..": {"text": "three"},
                            long_id: {"text": "four"},
                            "tab\there": {"text": "five"},
                            "温度/曲线": {"text": "six"},
                            "dup": {"text": "attr"},
                            "empty": {"text": ""},
                            "nul\u0000byte": {"text": "seven"},
                            "big": {"zeros": (4 << 30) + 12345, "md5": ZEROS_MD5},
                        },
                        "measurepoints": {"dup": {"text": "mp"}},
                    }
                    if i == 0
                    else {"assetId": f"a{i:05d}", "productKey": "p"}
                    for i in range(assets)
                ],
            }
        ],
    }
    path = tmp / "seed.json"
    path.write_text(json.dumps(seed))
    return path


def test_hostile_names_stay_in_their_folder(
    tmp_path_factory: pytest.TempPathFactory, work: Path
) -> None:
    data = tmp_path_factory.mktemp("hostile")
    with emulator(data / "state", str(hostile_seed(data))) as emu:
        emu.app_key, emu.app_secret, emu.org = "k", "s3cr3t-value", "o1"
        with mounted(work, emu) as m:
            org = m.path / "o1"
            assets = os.listdir(org)
            assert "..._escape" not in assets and ".._escape" in assets
            folder = org / ".._escape" / "feature"
            names = os.listdir(folder)
            assert len(names) == len(set(names)) == 11
            for name in names:
                assert "/" not in name and name not in (".", "..")
                assert len(name.encode()) <= 255
                assert (folder / name).resolve().parent == folder.resolve()
            assert {
                "dup.txt",
                "dup~2.txt",
                "温度_曲线.txt",
                ".._.._etc_passwd.txt",
                "...txt",
                "a_b.txt",
                "tab_here.txt",
                "big.bin",
            } <= set(names)
            contents = {(folder / n).read_bytes() for n in names if n != "big.bin"}
            assert {
                b"one",
                b"two",
                b"three",
                b"four",
                b"five",
                b"six",
                b"seven",
                b"attr",
                b"mp",
                b"",
            } == contents
            big = folder / "big.bin"
            assert big.stat().st_size == (4 << 30) + 12345
            assert read_range(big, (4 << 30) + 100, 1000) == bytes(1000)
            assert read_range(big, (4 << 30) + 12000, 1000) == bytes(345)


def test_ten_thousand_assets_are_paged(
    tmp_path_factory: pytest.TempPathFactory, work: Path
) -> None:
    data = tmp_path_factory.mktemp("many")
    with emulator(data / "state", str(hostile_seed(data, 10_000))) as emu:
        emu.app_key, emu.app_secret, emu.org = "k", "s3cr3t-value", "o1"
        with mounted(work, emu) as m:
            emu.reset_stats()
            assert len(set(os.listdir(m.path / "o1")) - {"by-name", "by-key"}) == 10_000
            assert emu.stats()["devices.search"] == 50


def small_seed(tmp: Path, devices: list[dict[str, Any]], **org: Any) -> Path:
    """A seed for organisation o1 (app k): one product whose model has FILE attributes."""
    features = sorted({f for d in devices for f in d.get("attributes", {})})
    seed = {
        "apps": [{"appKey": "k", "appSecret": "s3cr3t-value"}],
        "orgs": [
            {
                "orgId": "o1",
                "models": [{"modelId": "m", "attributes": dict.fromkeys(features, "FILE")}],
                "products": [{"productKey": "p", "modelId": "m"}],
                "devices": [{"productKey": "p", **d} for d in devices],
                **org,
            }
        ],
    }
    path = tmp / "seed.json"
    path.write_text(json.dumps(seed))
    return path


BAD_SIZES = {"huge": 2**64, "int64": 2**63, "negative": -5, "fraction": 12.5, "word": "lots"}
BAD_TIMES = {"late": 10**20, "early": -(10**20), "far": 10**40}


def test_one_impossible_metadata_record_costs_only_its_own_file(
    tmp_path_factory: pytest.TempPathFactory, work: Path
) -> None:
    data = tmp_path_factory.mktemp("records")
    idents = ["ok1", "ok2", *BAD_SIZES, *BAD_TIMES]
    device = {"assetId": "d1", "attributes": {i: {"text": f"file {i}"} for i in idents}}
    firmwares = [
        {"productKey": "p", "name": "fw", "version": v, "text": f"image {v}", "fileName": "a.bin"}
        for v in ("1", "2", "3")
    ]
    seed = str(small_seed(data, [device], firmwares=firmwares))
    with emulator(data / "state", seed):
        pass  # builds the state, which is then spoilt below, as a server might answer
    state_file = data / "state" / "state.json"
    state = json.loads(state_file.read_text())
    attrs = state["orgs"][0]["devices"][0]["attributes"]
    blobs = {b["uri"]: b for b in state["blobs"]}
    for ident, size in BAD_SIZES.items():
        blobs[attrs[ident]]["size"] = size
    for ident, when in BAD_TIMES.items():
        blobs[attrs[ident]]["create_time_ms"] = when
    fws = sorted(state["orgs"][0]["firmwares"], key=lambda f: f["version"])
    fws[0]["size"] = 2**64  # in the firmware search; getFileInfo still tells the truth
    fws[1]["create_time_ms"] = 10**40
    state_file.write_text(json.dumps(state))
    with emulator(data / "state", seed) as emu:  # the same seed: the state is reused
        emu.app_key, emu.app_secret, emu.org = "k", "s3cr3t-value", "o1"
        assert emu.blobs()[attrs["huge"]]["size"] == 2**64  # the spoilt state is served
        started = time.time()
        with mounted(work, emu) as m:
            folder = m.path / "o1" / "d1" / "feature"
            # A listing does not size: the first `ls -l` sizes the folder, finds the
            # impossible records, and cannot show those; from then on they are gone.
            out = run("ls", "-l", folder)
            complaints = [ln for ln in out.stderr.splitlines() if ln]
            assert all(any(f"/{b}.txt'" in ln for b in BAD_SIZES) for ln in complaints), out
            out = run("ls", "-l", folder)
            assert out.returncode == 0, out.stderr
            names = sorted(os.listdir(folder))
            assert names == ["early.txt", "far.txt", "late.txt", "ok1.txt", "ok2.txt"]
            for ident in ("ok1", "ok2", *BAD_TIMES):
                assert (folder / f"{ident}.txt").read_bytes() == f"file {ident}".encode()
            for ident in BAD_TIMES:  # shown with the mount's own time
                assert started - 1 <= (folder / f"{ident}.txt").stat().st_mtime <= time.time()
            # Named by its URI, a hidden file answers with a clear error, not wrong bytes.
            with pytest.raises(OSError) as info:
                (folder / uri_id(attrs["huge"])).read_bytes()
            assert info.value.errno == errno.EIO
            ota = m.path / "o1" / "d1" / "ota"
            out = run("ls", "-l", ota)
            assert out.returncode == 0, out.stderr
            assert sorted(os.listdir(ota)) == ["fw-1.bin", "fw-2.bin", "fw-3.bin"]
            assert started - 1 <= (ota / "fw-2.bin").stat().st_mtime <= time.time()
            for v in ("1", "2", "3"):
                path = ota / f"fw-{v}.bin"
                assert path.stat().st_size == len(f"image {v}")
                assert path.read_bytes() == f"image {v}".encode()
            os.listdir(folder)
        said = [ln for ln in m.log_text().splitlines() if "not showing" in ln]
        assert len(said) == len(BAD_SIZES), said
        assert "Traceback" not in m.log_text()


def test_asset_ids_with_the_same_safe_name_all_appear(
    tmp_path_factory: pytest.TempPathFactory, work: Path
) -> None:
    data = tmp_path_factory.mktemp("assets")
    ids = ["a/b", "a_b", "..", "__", "x\u2215y"]
    devices = [{"assetId": a, "attributes": {"id": {"text": f"asset {a}"}}} for a in ids]
    # Configured names, unsafe as folder names, settle among the server's.
    config = (
        'assets = ["a\\\\b", "c\\u202ed", ".."]\n'
        '[[file]]\norg = "o1"\nasset = "a/b"\nname = "copy.txt"\nuri = "{uri}"\n'
    )
    want = {
        "a_b": "a_b",
        "a_b~2": "a/b",
        "__": "__",
        "__~2": "..",
        "x_y": "x\u2215y",
    }
    with emulator(data / "state", str(small_seed(data, devices))) as emu:
        emu.app_key, emu.app_secret, emu.org = "k", "s3cr3t-value", "o1"
        found = emu.state()["orgs"][0]["devices"]
        uri = next(d for d in found if d["asset_id"] == "a_b")["attributes"]["id"]
        listings = []
        for _ in range(2):  # the same names after a remount
            with mounted(work, emu, config.format(uri=uri)) as m:
                org = m.path / "o1"
                listings.append(sorted(os.listdir(org)))
                for name, asset in want.items():
                    got = (org / name / "feature" / "id.txt").read_bytes()
                    assert got == f"asset {asset}".encode(), name
                # The configured file is fetched with the real asset id, a/b.
                assert (org / "a_b~2/feature/copy.txt").read_bytes() == b"asset a_b"
                assert os.listdir(org / "a_b~3/feature") == []
                assert os.listdir(org / "c_d/feature") == []
        assert listings[0] == listings[1] == sorted([*want, "a_b~3", "c_d", "by-key", "by-name"])


def test_config_that_is_a_folder(work: Path) -> None:
    out = enosfs("mount", "--config", work, work / "m")
    assert out.returncode == 1 and "cannot read" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("case", ["not-a-dir", "already-mounted"])
def test_bad_mountpoints(emu: Emulator, work: Path, case: str) -> None:
    cfg = write_config(work / "c.toml", emu)
    if case == "not-a-dir":
        target = work / "file"
        target.write_text("x")
        out = enosfs(
            "mount",
            "--config",
            cfg,
            target,
            env=secret_env(emu.app_secret),
        )
        assert out.returncode == 1 and "not a directory" in out.stderr
        return
    with mounted(work, emu) as m:
        out = enosfs(
            "mount",
            "--config",
            cfg,
            m.path,
            env=secret_env(emu.app_secret),
        )
        assert out.returncode == 1 and "already a mountpoint" in out.stderr
        assert out.stderr.count("\n") == 1


# -- security -------------------------------------------------------------------------


def test_secrets_never_reach_logs_ps_or_errors(emu: Emulator, work: Path) -> None:
    with mounted(work, emu, FAST) as m:
        out = run("md5sum", *sorted((m.org / "WTG-001/feature").iterdir()))
        assert out.returncode == 0
        emu.admin("POST", "tokens/revoke")
        emu.faults({"kind": "error", "status": 503, "share": 0.3, "match": "files.*"})
        run("cat", m.org / "WTG-002/feature/model_file.json")
        tokens = emu.admin("GET", "tokens")["tokens"]
        cmdline = Path(f"/proc/{m.proc.pid}/cmdline").read_bytes().decode()
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        log = m.log_text()
        assert "DEBUG" in log  # the log was at its most talkative
    stderr = m.stderr
    for secret in [emu.app_secret, *tokens]:
        for where, text in (("log", log), ("cmdline", cmdline), ("ps", ps), ("stderr", stderr)):
            assert secret not in text, f"a secret is in the {where}"


def test_not_allow_other_unless_asked(emu: Emulator, work: Path) -> None:
    with mounted(work, emu) as m:
        line = next(
            ln
            for ln in Path("/proc/mounts").read_text().splitlines()
            if ln.split()[1] == str(m.path)
        )
        options = line.split()[3].split(",")
        assert "ro" in options and "allow_other" not in options


def make_cert(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_tls_is_verified_and_a_private_ca_can_be_named(demo_emu: Emulator, work: Path) -> None:
    cert, key = make_cert(work)
    with emulator(demo_emu.data_dir, "demo", "--tls-cert", str(cert), "--tls-key", str(key)) as emu:
        assert emu.url.startswith("https://")
        cfg = write_config(work / "c.toml", emu)
        (work / "m1").mkdir()
        out = enosfs(
            "mount",
            "-f",
            "--config",
            cfg,
            work / "m1",
            env=secret_env(emu.app_secret),
            timeout=60,
        )
        assert out.returncode == 1 and "certificate" in out.stderr.lower(), out.stderr
        assert not is_mounted(work / "m1")
        with mounted(work, emu, f'[network]\nca_bundle = "{cert}"\n') as m:
            rel = "WTG-003/feature/model_file.json"
            assert (m.org / rel).read_bytes() == emu.blob(demo_files(emu)[rel])
