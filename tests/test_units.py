"""Layer 1: pure units. No network, no FUSE."""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import pytest

from enosfs import heap
from enosfs.api import (
    BadRecord,
    FileMeta,
    check_envelope,
    file_features,
    parse_content_range,
    parse_device,
    parse_file_meta,
    parse_firmware,
)
from enosfs.config import SECRET_ENV, Secret, load_settings, parse_seconds, parse_size
from enosfs.emulator.app import parse_range
from enosfs.emulator.expr import ExpressionError, compile_expression
from enosfs.errors import (
    ConfigError,
    Denied,
    InvalidArgument,
    NotFound,
    ProtocolError,
    RateLimited,
    ServerError,
    TokenRejected,
    errno_of,
)
from enosfs.linkspeed import LinkSpeed
from enosfs.naming import (
    NAME_MAX,
    feature_file_name,
    firmware_file_name,
    safe_name,
    settle,
    uri_extension,
    uri_id,
)
from enosfs.readahead import FolderReadAhead, MiB, ReadAhead
from enosfs.signature import token_signature

# -- signature ---------------------------------------------------------------------------


def test_signature_is_sha256_of_key_timestamp_secret() -> None:
    expected = "85fce9b43916998b4d6288d98c4daf07fad39ed02036eec506595c90341685a0"
    assert token_signature("appKey", 1572574909697, "appSecret") == expected
    assert token_signature("appKey", "1572574909697", "appSecret") == expected


# -- naming ------------------------------------------------------------------------------


def test_uri_parts() -> None:
    assert uri_id("enos-connect://2963ede9f0800000.txt") == "2963ede9f0800000.txt"
    assert uri_extension("enos-connect://23f5ff270b800000.ZIP") == ".zip"
    assert uri_extension("enos-connect://23f5ff270b800000") == ""


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("a/b", "a_b"),
        ("nul\x00here", "nul_here"),
        (".", "_"),
        ("..", "__"),
        ("", "unnamed"),
        ("tab\tnew\nline", "tab_new_line"),
        ("back\\slash", "back_slash"),
        ("ok name.csv", "ok name.csv"),
    ],
)
def test_safe_name(raw: str, want: str) -> None:
    assert safe_name(raw) == want


@pytest.mark.parametrize(
    "char",
    [
        *("\u202e", "\u202a", "\u2066", "\u2069", "\u200e", "\u200f"),  # bidi
        *("\u2215", "\u2044", "\uff0f", "\u29f8"),  # drawn like '/'
        *("\x85", "\x9b"),  # C1 controls
    ],
)
def test_safe_name_drops_bidi_overrides_lookalike_slashes_and_c1_controls(char: str) -> None:
    # What `ls` shows must be what the name is: no reordering, no fake path separators.
    assert safe_name(f"report{char}fdp.exe") == "report_fdp.exe"
    assert safe_name(f"a{char}b.csv") == "a_b.csv"


def test_safe_name_leaves_ordinary_unicode_alone() -> None:
    for name in ("温度曲线.csv", "Ärger ½ü.txt", "naïve–dash—x.bin", "a\u200db"):
        assert safe_name(name) == name


def test_long_names_are_cut_to_255_bytes_keeping_extension_and_uniqueness() -> None:
    a = safe_name("é" * 300 + ".csv")
    b = safe_name("é" * 299 + "x.csv")
    assert len(a.encode()) <= NAME_MAX and len(b.encode()) <= NAME_MAX
    assert a.endswith(".csv") and b.endswith(".csv")
    assert a != b


def test_lone_surrogates_become_valid_utf8() -> None:
    name = safe_name("bad\udcffname")
    name.encode("utf-8")  # must not raise
    assert name.startswith("bad") and name.endswith("name")


def test_feature_and_firmware_names() -> None:
    assert feature_file_name("manual", "enos-connect://ab12.pdf") == "manual.pdf"
    assert feature_file_name("a/b", "enos-connect://ab12") == "a_b"
    assert firmware_file_name("ctrl", "1.2.0", "enos-connect://x.bin") == "ctrl-1.2.0.bin"
    assert firmware_file_name("../..", "", "enos-connect://x") == ".._.."
    assert "/" not in firmware_file_name("a/b", "1/2", "enos-connect://x.hex")


def test_settle_is_deterministic_and_unique() -> None:
    items = [("x.csv", ("1", "b")), ("x.csv", ("0", "a")), ("y", ("0",)), ("x~2.csv", ("9",))]
    names = settle(items)
    assert names == settle(items)
    assert len(set(names)) == len(names)
    # The smallest key keeps the wanted name, whatever the input order.
    assert names[1] == "x.csv"
    assert names[0] not in ("x.csv", "x~2.csv") and names[0].endswith(".csv")
    assert settle(list(reversed(items))) == list(reversed(names))


def test_settle_folders_puts_the_suffix_at_the_end() -> None:
    names = settle([("WT.001", ("1", "WT/001")), ("WT.001", ("0", "WT.001"))], extensions=False)
    assert names == ["WT.001~2", "WT.001"]


# -- config ------------------------------------------------------------------------------


def write(tmp: Path, text: str) -> Path:
    p = tmp / "c.toml"
    p.write_text(text)
    return p


BASE = '[enos]\ngateway = "https://gw.example"\napp_key = "k"\n[[org]]\nid = "o1"\n'
FILE = BASE + '[[file]]\norg = "o1"\nasset = "a"\nuri = "enos-connect://x.txt"\n'


def test_config_minimal_with_secret_from_env(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, BASE), env={SECRET_ENV: "s3cret"})
    assert s.integration == "https://gw.example"
    assert s.app_secret.reveal() == "s3cret"
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.redacted())


def test_config_full(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    secret.chmod(0o600)
    text = BASE.replace(
        'app_key = "k"',
        'app_key = "k"\napp_secret_file = "secret"\nintegration = "https://int.example/"',
    ) + (
        '[[file]]\norg = "o1"\nasset = "a1"\ncategory = "ota"\nuri = "enos-connect://x.bin"\n'
        '[cache]\nmemory = "64MiB"\nblock_size = "256KiB"\nmetadata_ttl = "2m"\n'
        'read_ahead = "16MiB"\n'
        '[kernel]\nentry_timeout = 1.5\nattr_timeout = "500ms"\n'
        '[network]\ntimeout = "45s"\nmax_connections = 8\n'
    )
    s = load_settings(write(tmp_path, text), env={})
    assert s.app_secret == Secret("from-file")
    assert s.integration == "https://int.example"
    assert s.files[0].category == "ota"
    assert (s.cache_memory, s.block_size, s.metadata_ttl) == (64 * MiB, 256 * 1024, 120.0)
    assert (s.entry_timeout, s.attr_timeout, s.timeout) == (1.5, 0.5, 45.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "[cache]\nmemroy = 1\n", "unknown key 'cache.memroy'"),
        ("bogus = 1\n" + BASE, "unknown key 'bogus'"),
        (BASE + "bogus = 1\n", "unknown key 'org[0].bogus'"),
        (BASE + "[cache]\nmemory = 'lots'\n", "cache.memory must be a size"),
        (BASE + "[cache]\nblock_size = '3KiB'\n", "power of two"),
        (BASE + "[kernel]\nallow_other = 'yes'\n", "kernel.allow_other must be true or false"),
        (BASE.replace("https://gw.example", "ftp://x"), "enos.gateway must be an http(s) URL"),
        (BASE.replace('[[org]]\nid = "o1"\n', ""), "at least one organisation"),
        (
            BASE.replace('app_key = "k"\n', 'app_key = "k"\napp_secret = "x"\n'),
            "enos.app_secret is not allowed",
        ),
        ("not toml [", "not valid TOML"),
        (
            BASE + '[[file]]\norg = "o2"\nasset = "a"\nuri = "enos-connect://x"\n',
            "is not one of the [[org]] ids",
        ),
        (FILE + 'name = "a/b"\n', "file[0].name 'a/b' must not contain '/'"),
        (FILE + 'name = "a\\nb"\n', "file[0].name 'a\\nb' must not contain NUL or control"),
        (FILE + 'name = "a\\u0000b"\n', "file[0].name 'a\\x00b' must not contain NUL"),
        (FILE + 'name = "a\\u009bb"\n', "must not contain NUL or control characters"),
        (FILE + 'name = ".."\n', "file[0].name must not be '.' or '..'"),
        (FILE + 'name = "."\n', "file[0].name must not be '.' or '..'"),
        (FILE + 'name = ""\n', "file[0].name must be a non-empty string"),
        (FILE + f'name = "{"é" * 128}"\n', "file[0].name must be at most 255 bytes"),
        (FILE + 'name = "x\\u202eb"\n', "file[0].name 'x\\u202eb' is not a safe file name"),
        (FILE + 'name = "a\u2215b"\n', "is not a safe file name; use 'a_b'"),
    ],
)
def test_config_errors_are_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={SECRET_ENV: "s"})
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_config_missing_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no app secret"):
        load_settings(write(tmp_path, BASE), env={})


def test_config_refuses_secret_file_readable_by_others(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o644)
    text = BASE.replace('app_key = "k"', 'app_key = "k"\napp_secret_file = "secret"')
    with pytest.raises(ConfigError, match="chmod 600"):
        load_settings(write(tmp_path, text), env={})


def test_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings(tmp_path / "nope.toml", env={})


def test_sizes_and_durations() -> None:
    assert parse_size("1.5GiB", "x") == 3 * 512 * MiB
    assert parse_size(4096, "x") == 4096
    assert parse_size("4M", "x") == 4_000_000
    assert parse_seconds("250ms", "x") == 0.25
    assert parse_seconds("5m", "x") == 300
    for bad in ("-1", True, "1 parsec"):
        with pytest.raises(ConfigError):
            parse_size(bad, "x")


# -- envelopes and headers ---------------------------------------------------------------


def test_envelope_success() -> None:
    doc = check_envelope(200, b'{"code":0,"msg":"OK","data":[1]}', "w")
    assert doc is not None and doc["data"] == [1]


@pytest.mark.parametrize(
    ("status", "body", "exc", "err"),
    [
        (200, b'{"code":99404,"msg":"gone","requestId":"r1"}', NotFound, errno.ENOENT),
        (200, b'{"code":24404,"msg":"Firmware not found"}', NotFound, errno.ENOENT),
        (200, b'{"code":99403,"msg":"no"}', Denied, errno.EACCES),
        (200, b'{"code":99400,"msg":"bad"}', InvalidArgument, errno.EIO),
        (200, b'{"code":99500,"msg":"oops"}', ServerError, errno.EIO),
        (400, b'{"code":99404,"msg":"gone"}', NotFound, errno.ENOENT),
        (200, b'{"code":1203,"msg":"expired"}', TokenRejected, errno.EACCES),
        (200, b'{"apim_status":4011,"msg":"expired"}', TokenRejected, errno.EACCES),
        (401, b'{"message":"Invalid authentication credentials"}', TokenRejected, errno.EACCES),
        (429, b'{"message":"API rate limit exceeded"}', RateLimited, errno.EIO),
        (503, b"<html>busy</html>", ServerError, errno.EIO),
        (200, b"not json", ProtocolError, errno.EIO),
    ],
)
def test_envelope_failures(status: int, body: bytes, exc: type, err: int) -> None:
    with pytest.raises(exc) as info:
        check_envelope(status, body, "what")
    assert errno_of(info.value) == err
    assert "\n" not in str(info.value)


def test_envelope_carries_code_message_and_request_id() -> None:
    with pytest.raises(NotFound) as info:
        check_envelope(200, b'{"code":99404,"msg":"file gone","requestId":"req-7"}', "download")
    e = info.value
    assert (e.code, e.msg, e.request_id) == (99404, "file gone", "req-7")
    assert "req-7" in str(e) and "99404" in str(e) and str(e).startswith("download: ")


def test_file_content_that_is_not_an_envelope_passes() -> None:
    assert check_envelope(200, b'{"rated_power": 3000}', "d", require_envelope=False) is None
    assert check_envelope(200, b"\x89PNG", "d", require_envelope=False) is None


def test_content_range() -> None:
    assert parse_content_range("bytes 0-99/1000") == (0, 99, 1000)
    assert parse_content_range("bytes */1000") == (None, None, 1000)
    assert parse_content_range("bytes 5-9/*") == (5, 9, None)
    assert parse_content_range("garbage") == (None, None, None)


def test_file_meta_parsing() -> None:
    m = parse_file_meta(
        "enos-connect://a.txt",
        {"fileSize": "12", "md5": "A" * 32, "originalFilename": "x.txt", "createTime": 5},
    )
    assert (m.size, m.md5, m.original_name, m.create_time_ms) == (12, "a" * 32, "x.txt", 5)
    with pytest.raises(ProtocolError):
        parse_file_meta("enos-connect://a.txt", {"md5": "x"})
    with pytest.raises(ProtocolError):
        parse_file_meta("enos-connect://a.txt", None)


@pytest.mark.parametrize("size", [2**63, 2**64, -1, 12.5, "12.5", "lots", True, [1]])
def test_file_meta_with_an_impossible_size_is_a_bad_record(size: object) -> None:
    with pytest.raises(BadRecord) as info:
        parse_file_meta("enos-connect://a.txt", {"fileSize": size})
    assert "a.txt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BadRecord):
        FileMeta(uri="enos-connect://b.bin", size=2**63)  # e.g. from a probe's Content-Range
    assert parse_file_meta("enos-connect://a.txt", {"fileSize": 2**63 - 1}).size == 2**63 - 1


@pytest.mark.parametrize("when", [10**20, -1, -(10**20), 2**63, "soon", 1.5])
def test_impossible_create_times_are_dropped(when: object) -> None:
    meta = parse_file_meta("enos-connect://a.txt", {"fileSize": 1, "createTime": when})
    assert meta.create_time_ms is None
    fw = parse_firmware({"fileUrl": "enos-connect://f.bin", "createTime": when})
    assert fw is not None and fw.create_time_ms is None
    dev = parse_device({"assetId": "a", "createTime": when})
    assert dev is not None and dev.create_time_ms is None


def test_firmware_with_an_impossible_size_has_none() -> None:
    for size in (2**63, -5, "x", 1.5):
        fw = parse_firmware({"fileUrl": "enos-connect://f.bin", "fileSize": size})
        assert fw is not None and fw.size is None  # getFileInfo is asked instead
    fw = parse_firmware({"fileUrl": "enos-connect://f.bin", "fileSize": 7, "createTime": 9})
    assert fw is not None and (fw.size, fw.create_time_ms) == (7, 9)


def test_file_features_from_maps_or_lists() -> None:
    model = {
        "attributes": {
            "m": {"identifier": "m", "dataType": "FILE"},
            "p": {"identifier": "p", "dataType": "DOUBLE"},
        },
        "measurepoints": [{"identifier": "s", "dataType": "file"}, "junk"],
    }
    f = file_features(model)
    assert f.attributes == ("m",) and f.measurepoints == ("s",) and f.events == ()
    assert file_features(None).attributes == ()


# -- read-ahead --------------------------------------------------------------------------


def test_readahead_grows_while_sequential_and_stops_on_jump() -> None:
    ra = ReadAhead(initial=1 * MiB, maximum=8 * MiB)
    size = 1024 * MiB
    step = 64 * 1024
    assert ra.on_read(0, step, size) is None  # small reads: not a pattern yet
    assert ra.on_read(step, step, size) is None
    assert not ra.sequential
    first = ra.on_read(2 * step, step, size)
    assert first == (3 * step, 3 * step + 1 * MiB)
    assert ra.sequential
    windows = []
    off = 3 * step
    for _ in range(800):
        got = ra.on_read(off, step, size)
        if got:
            windows.append(got[1] - got[0])
            assert got[0] >= off  # never fetches what was already asked for
        off += step
    assert ra.window == 8 * MiB
    assert max(windows) <= 8 * MiB
    assert ra.on_read(500 * MiB, 4096, size) is None
    assert ra.window == 0 and not ra.sequential


def test_readahead_keeps_its_window_full_a_request_at_a_time() -> None:
    """Once open, the window is topped up as the reader moves, in requests of an eighth
    of it: never less than a request unless at the end of the file, and what is asked
    for reaches at least a request short of a whole window ahead after every read."""
    ra = ReadAhead(initial=1 * MiB, maximum=64 * MiB)
    size = 300 * MiB
    step = 128 * 1024
    ahead_to, lengths = 0, []
    for off in range(0, size, step):
        got = ra.on_read(off, step, size)
        if got is not None:
            assert got[0] == max(off + step, ahead_to)  # contiguous, nothing asked twice
            assert got[1] - got[0] >= ra.request or got[1] == size
            ahead_to = got[1]
            lengths.append(got[1] - got[0])
        if off >= 40 * MiB and off + step + ra.window < size:
            assert ra.window == 64 * MiB and ra.request == 8 * MiB
            assert ahead_to >= off + step + ra.window - ra.request
    assert ahead_to == size
    assert lengths.count(8 * MiB) >= 20  # the steady state: one request at a time


def test_readahead_asks_again_for_what_the_budget_clipped() -> None:
    ra = ReadAhead(initial=1 * MiB, maximum=8 * MiB)
    size = 100 * MiB
    step = 128 * 1024
    first = ra.on_read(0, step, size)
    assert first == (step, step + 1 * MiB)
    ra.clipped(step)  # nothing of it could be fetched
    got = ra.on_read(step, step, size)
    assert got is not None and got[0] == 2 * step


def test_readahead_starts_at_once_for_large_reads() -> None:
    """A 128 KiB kernel read means the application asked for more: fetch ahead now,
    even after a jump (random 1 MiB reads arrive as runs of 128 KiB reads)."""
    ra = ReadAhead(initial=1 * MiB)
    size = 1024 * MiB
    assert ra.on_read(300 * MiB + 5, 128 * 1024, size) == (
        300 * MiB + 5 + 128 * 1024,
        300 * MiB + 5 + 128 * 1024 + 1 * MiB,
    )
    assert ra.on_read(10 * MiB, 128 * 1024, size) is not None


def test_readahead_tolerates_the_kernels_out_of_order_reads() -> None:
    ra = ReadAhead(initial=1 * MiB, tolerance=4 * MiB)
    size = 1024 * MiB
    for off in (0, 64 * 1024, 128 * 1024):
        ra.on_read(off, 64 * 1024, size)
    for off in (3 * MiB, 1 * MiB, 2 * MiB, 5 * MiB, 4 * MiB):
        ra.on_read(off, 1 * MiB, size)
        assert ra.sequential


def test_readahead_never_for_random_reads() -> None:
    ra = ReadAhead()
    import random

    rnd = random.Random(1)
    hits = [ra.on_read(rnd.randrange(0, 1000) * 4 * MiB, 4096, 4096 * MiB) for _ in range(200)]
    assert all(h is None for h in hits)


def test_readahead_stops_at_end_of_file() -> None:
    ra = ReadAhead(initial=1 * MiB)
    size = 1 * MiB
    ra.on_read(0, 64 * 1024, size)
    ra.on_read(64 * 1024, 64 * 1024, size)
    got = ra.on_read(128 * 1024, 64 * 1024, size)
    assert got is not None and got[1] == size
    assert ra.on_read(size - 100, 100, size) is None


def test_readahead_says_before_a_read_whether_it_is_random() -> None:
    """Asked before each read, as fs.py does: small reads with no run behind them are
    random (their misses fetch pieces); the third read of a run, or any large read, is
    not (whole blocks)."""
    ra = ReadAhead()
    size = 1024 * MiB
    verdicts = []
    for off in (500 * MiB, 7 * MiB, 7 * MiB + 4096, 7 * MiB + 8192, 7 * MiB + 12288, 90 * MiB):
        verdicts.append(ra.random(off, 4096))
        ra.on_read(off, 4096, size)
        assert verdicts[-1] == (not ra.sequential)
    assert verdicts == [True, True, True, False, False, True]
    assert not ra.random(300 * MiB, 128 * 1024)


# -- link speed ------------------------------------------------------------------------


def test_link_speed_sizes_a_random_fetch_by_a_share_of_the_round_trip() -> None:
    """A miss fetches what the link brings in a sixteenth of its round trip (at most
    5 ms of it): whole pages below a piece, whole pieces from one on."""
    piece, page = 64 * 1024, 4096
    link = LinkSpeed(piece, 1 * MiB, 2 * piece)
    assert link.span() == 2 * piece  # nothing measured yet
    link.first_byte(0.040)
    assert link.span() == 2 * piece  # a round trip, but no speed yet
    link.body(2_000_000, 1.0)  # a thin link: 2.5 ms bring 5000 bytes, one whole page
    assert link.span() == page
    for _ in range(16):
        link.body(25_000_000, 1.0)  # 62_500 bytes: whole pages below a piece
    assert link.span() == 15 * page
    link.body(5 * piece, 0.001)  # too short to time: says nothing
    assert link.bandwidth == 25_000_000
    for _ in range(16):
        link.body(125_000_000, 1.0)  # 312_500 bytes: whole pieces from one on
    assert link.span() == 4 * piece
    for _ in range(16):
        link.body(1_000_000_000, 1.0)
    assert link.span() == 1 * MiB  # never over the limit (a block)
    link.first_byte(0.200)  # a new connection, a retry: the least round trip holds
    assert link.rtt == 0.040
    for _ in range(16):
        link.first_byte(0.0001)  # loopback: 6 us bring 6250 bytes
    assert link.span() == page  # at least a page
    assert link.stats() == {"rtt_ms": 0.1, "bytes_per_s": 1_000_000_000, "random_fetch_bytes": page}


def test_link_speed_spends_at_most_5_ms_on_bytes_beyond_the_read() -> None:
    """Far away, a sixteenth of the round trip would be long: 5 ms is the most."""
    link = LinkSpeed(64 * 1024, 1 * MiB, 128 * 1024)
    link.first_byte(0.200)
    link.body(2_000_000, 1.0)  # 10_000 bytes in 5 ms (12.5 ms would bring 25_000)
    assert link.span() == 2 * 4096
    link.body(25_000_000, 1.0)
    link.body(25_000_000, 1.0)  # the median: 125_000 bytes in 5 ms, one whole piece
    assert link.span() == 64 * 1024
    small_pages = LinkSpeed(64 * 1024, 1 * MiB, 128 * 1024, page=512)
    small_pages.first_byte(0.200)
    small_pages.body(2_000_000, 1.0)
    assert small_pages.span() == 19 * 512  # whole pages, whatever their size


# -- emulator pieces ---------------------------------------------------------------------


def test_emulator_range_parsing() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=50-1000", 100) == (50, 99)
    assert parse_range("bytes=100-", 100) == "unsatisfiable"
    assert parse_range("bytes=0-0", 0) == "unsatisfiable"
    assert parse_range("bytes=0-1,5-6", 100) is None
    assert parse_range("items=0-1", 100) is None


def test_expressions() -> None:
    doc = {
        "productKey": "pk1",
        "assetId": "a",
        "deviceName": {"defaultValue": "Turbine 7", "i18nValue": {"en_US": "T7"}},
        "deviceTags": {"site": "north"},
    }
    assert compile_expression("productKey = 'pk1'")(doc)
    assert compile_expression("productKey in ('x', \"pk1\")")(doc)
    assert not compile_expression("productKey != 'pk1'")(doc)
    assert compile_expression("deviceName like 'turbine'")(doc)
    assert compile_expression("deviceName.en_US = 'T7'")(doc)
    assert compile_expression("exists(deviceTags.site) and not exists(deviceTags.x)")(doc)
    assert compile_expression("(assetId = 'b' or assetId = 'a') and productKey='pk1'")(doc)
    assert compile_expression("")(doc)
    with pytest.raises(ExpressionError):
        compile_expression("productKey ==")
    with pytest.raises(ExpressionError):
        compile_expression("productKey = 'a' garbage")


def test_secret_never_prints() -> None:
    s = Secret("hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s}"
    assert s.reveal() == "hunter2"
    assert os.environ.get(SECRET_ENV) != "hunter2"


# -- gateway URLs and secret files -------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "url", "message"),
    [
        ("gateway", "https://user:hunter2@gw.example", "enos.gateway must not hold credentials"),
        ("gateway", "https://hunter2@gw.example/x", "enos.gateway must not hold credentials"),
        ("gateway", "https://u:hunter2@[::1", "enos.gateway must not hold credentials"),
        ("integration", "https://u:hunter2@int.example", "enos.integration must not hold cred"),
        ("gateway", "http://[::1", "enos.gateway is not a valid URL (Invalid IPv6 URL)"),
        ("gateway", "http://gw.example:99999", "not a valid URL (Port out of range 0-65535)"),
        ("integration", "http://gw.example:x", "enos.integration is not a valid URL"),
        ("gateway", "http://gw.example:0", "enos.gateway is not a valid URL"),
        ("gateway", "http://gw example", "enos.gateway is not a valid URL"),
        ("gateway", "http://[::1]x", "enos.gateway is not a valid URL (Invalid port"),
    ],
)
def test_config_refuses_bad_urls_in_one_line_without_the_password(
    tmp_path: Path, key: str, url: str, message: str
) -> None:
    if key == "gateway":
        text = BASE.replace("https://gw.example", url)
    else:
        text = BASE.replace('app_key = "k"', f'app_key = "k"\nintegration = "{url}"')
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={SECRET_ENV: "s"})
    assert message in str(info.value)
    assert "\n" not in str(info.value) and "hunter2" not in str(info.value)


def test_config_keeps_at_signs_outside_the_host_part(tmp_path: Path) -> None:
    text = BASE.replace("https://gw.example", "https://gw.example:8443/p@th")
    s = load_settings(write(tmp_path, text), env={SECRET_ENV: "s"})
    assert s.gateway == "https://gw.example:8443/p@th"


def test_config_refuses_a_secret_file_that_is_not_a_regular_file(tmp_path: Path) -> None:
    """A FIFO would block open() until a writer comes: the mount must refuse, not hang."""
    fifo = tmp_path / "secret"
    os.mkfifo(fifo, 0o600)
    text = BASE.replace('app_key = "k"', 'app_key = "k"\napp_secret_file = "secret"')
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_settings(write(tmp_path, text), env={})
    (tmp_path / "dir").mkdir(mode=0o700)
    text = BASE.replace('app_key = "k"', 'app_key = "k"\napp_secret_file = "dir"')
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_settings(write(tmp_path, text), env={})


def test_config_remembers_where_the_secret_file_is(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    secret.chmod(0o600)
    text = BASE.replace('app_key = "k"', 'app_key = "k"\napp_secret_file = "secret"')
    s = load_settings(write(tmp_path, text), env={})
    assert s.app_secret_file == str(secret) and "from-file" not in str(s.redacted())
    assert load_settings(write(tmp_path, BASE), env={SECRET_ENV: "x"}).app_secret_file is None


def test_a_file_looks_the_same_whether_listed_or_asked_about() -> None:
    """The firmware search gives a sign only, getFileInfo the sign and the md5: the
    same bytes must keep one version, or the file "changes" at every refresh (its
    cached blocks dropped and its readers told ESTALE)."""
    from enosfs.api import FileMeta

    sign = "ab" * 32
    listed = FileMeta(uri="enos-connect://x.hex", size=10, sign_method="sha256", sign=sign)
    asked = FileMeta(
        uri="enos-connect://x.hex", size=10, md5="cd" * 16, sign_method="sha256", sign=sign
    )
    assert listed.version == asked.version
    assert asked.digest == ("md5", "cd" * 16)  # the check still prefers the md5


def test_young_collections_are_spaced_for_a_big_tree() -> None:
    before = gc.get_threshold()
    try:
        heap.tune()
        assert gc.get_threshold() == (heap.YOUNG, before[1], before[2])
    finally:
        gc.set_threshold(*before)


def test_a_folder_read_ahead_starts_near_a_megabyte_of_files() -> None:
    """Sixteen 64 KiB files, not four; never fewer than four big ones; and once the
    pattern holds, up to 128 files ahead (what a fast link brings in a round trip, and
    half as much again)."""
    assert FolderReadAhead.for_files_of(64 * 1024).initial == 16
    assert FolderReadAhead.for_files_of(4 * MiB).initial == 4
    assert FolderReadAhead.for_files_of(None).initial == 4
    assert FolderReadAhead.for_files_of(100).initial == 32
    pattern = FolderReadAhead.for_files_of(64 * 1024)
    assert pattern.on_open(0, 1000) is None
    assert pattern.on_open(1, 1000) == (2, 18)
    ahead = []
    for i in range(2, 600):
        pattern.on_open(i, 1000)
        ahead.append(pattern._ahead_to - (i + 1))  # files fetched past the open one
    assert max(ahead) == 128 and min(ahead[100:]) >= 64  # topped up each half window
