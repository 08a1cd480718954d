"""Files kept in object storage (`enos-lark://`): read through a signed URL that is asked
for once, shared, renewed before it expires or when refused, and never logged; the
access token never goes to the object store."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import httpx
import pytest
import trio

from enosfs.api import _object_store_detail
from enosfs.emulator.demo import LARK_SIZE, LARK_URI
from enosfs.errors import NotFound, ProtocolError
from enosfs.signedurls import DEFAULT_LIFETIME, SignedUrls, lifetime_of, parse_signed, shown_url
from tests.support import Emulator, Mount, demo_files, known, mounted

LARK = "WTG-003/feature/blade_scan.dat"
# Small blocks and read-ahead: a read of the file is many requests, spread over time.
SMALL = '[cache]\nblock_size = "64KiB"\nread_ahead = "128KiB"\n'


# -- units: the URL and its lifetime ----------------------------------------------------


def test_lifetime_read_from_the_query() -> None:
    now = 1_800_000_000.0
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    s3 = httpx.URL(f"https://b.s3.example/k?X-Amz-Date={stamp}&X-Amz-Expires=600&X-Amz-Signature=x")
    assert lifetime_of(s3, now) == 600
    assert lifetime_of(s3, now + 100) == 500  # signed a while ago: what is left
    assert lifetime_of(s3, now + 5000) == 600  # "expired" by our clock: skew, trusted relative
    oss = httpx.URL(f"https://b.oss.example/k?Expires={int(now) + 120}&Signature=x")
    assert lifetime_of(oss, now) == 120
    azure = httpx.URL("https://a.blob.example/c/k?se=2027-01-15T08:00:00Z&sig=x")
    assert lifetime_of(azure, 1_800_000_000.0 - 60) > 0
    assert lifetime_of(httpx.URL("https://cdn.example/k?token=x"), now) == DEFAULT_LIFETIME
    assert lifetime_of(oss, now + 1000) == DEFAULT_LIFETIME  # past by our clock: skew


def test_a_url_is_shown_without_its_query() -> None:
    url = "https://user:pw@store.example:8443/bucket/a%20b.dat?X-Amz-Signature=s3cr3t#f"
    shown = shown_url(url)
    assert shown == "https://store.example:8443/bucket/a b.dat"
    assert "s3cr3t" not in shown and "pw" not in shown
    signed = parse_signed(url, "what", 0.0, time.time())
    assert signed.shown == shown and b"s3cr3t" in signed.target


def test_a_bad_url_is_refused_without_quoting_it() -> None:
    for raw in (None, 42, "", "ftp://host/x?sig=s3cr3t", "not a url s3cr3t"):
        with pytest.raises(ProtocolError) as info:
            parse_signed(raw, "download URL x", 0.0, 0.0)
        assert "s3cr3t" not in str(info.value)


def test_object_store_errors_are_summed_up_without_secrets() -> None:
    body = (
        b'<?xml version="1.0"?><Error><Code>SignatureDoesNotMatch</Code><Message>no match'
        b" for https://s.example/k?X-Amz-Signature=s3cr3t</Message>"
        b"<SignatureProvided>s3cr3t</SignatureProvided></Error>"
    )
    code, message = _object_store_detail(body)
    assert code == "SignatureDoesNotMatch"
    assert "s3cr3t" not in message and "https://s.example/k" in message
    assert _object_store_detail(b'{"code": "AccessDenied", "message": "expired"}') == (
        "AccessDenied",
        "expired",
    )


# -- units: one URL per file, shared, renewed --------------------------------------------


class FakeEnos:
    """getDownloadUrl, counted; each answer a new URL good for `lifetime` seconds."""

    def __init__(self, lifetime: int = 100) -> None:
        self.calls = 0
        self.lifetime = lifetime
        self.gate = trio.Event()

    async def fetch(self, key: str) -> str:
        self.calls += 1
        await self.gate.wait()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return (
            f"https://store.example/{key}?X-Amz-Date={stamp}"
            f"&X-Amz-Expires={self.lifetime}&X-Amz-Signature=sig{self.calls}"
        )


async def test_one_fetch_for_many_readers_then_kept() -> None:
    enos = FakeEnos()
    urls: SignedUrls[str] = SignedUrls(enos.fetch)
    got = []

    async def reader() -> None:
        got.append(await urls.get("a", "what"))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(reader)
        await trio.sleep(0.01)
        enos.gate.set()
    assert enos.calls == 1 and len({id(u) for u in got}) == 1
    assert await urls.get("a", "what") is got[0]
    assert enos.calls == 1
    await urls.get("b", "what")
    assert enos.calls == 2  # another file, another URL


async def test_renewed_before_expiry_and_when_refused(autojump_clock: trio.abc.Clock) -> None:
    enos = FakeEnos(lifetime=100)
    enos.gate.set()
    urls: SignedUrls[str] = SignedUrls(enos.fetch)
    first = await urls.get("a", "what")
    await trio.sleep(70)
    assert await urls.get("a", "what") is first  # still well within its lifetime
    await trio.sleep(15)  # 85 s: inside the margin before expiry
    second = await urls.get("a", "what")
    assert second is not first and enos.calls == 2
    # Refused by the object store: the first report drops it, a stale one changes nothing.
    urls.rejected("a", first)
    assert await urls.get("a", "what") is second
    urls.rejected("a", second)
    third = await urls.get("a", "what")
    assert third is not second and enos.calls == 3
    assert urls.stats() == {"fetched": 3, "kept": 1, "refused": 1}


async def test_a_failed_fetch_fails_every_waiter_once() -> None:
    calls = 0
    gate = trio.Event()

    async def fetch(key: str) -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise NotFound(99404, "file not found", what="download URL x")

    urls: SignedUrls[str] = SignedUrls(fetch)
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await urls.get("a", "what")
        except NotFound as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(reader)
        await trio.sleep(0.01)
        gate.set()
    assert calls == 1 and len(errors) == 5


# -- real mounts ------------------------------------------------------------------------


def lark_bytes(emu: Emulator) -> bytes:
    data = emu.blob(LARK_URI)
    assert len(data) == LARK_SIZE
    return data


def assert_no_secret_sent_or_logged(emu: Emulator, m: Mount) -> None:
    store = emu.objectstore()
    assert store["requests"] > 0
    assert store["with_token"] == 0, "the access token went to the object store"
    log = m.log_text()
    assert "DEBUG" in log  # the log was at its most talkative
    assert "X-Amz-Signature" not in log and "X-Amz-Date" not in log
    for signature in emu.admin("GET", "objectstore/signatures")["signatures"]:
        assert signature not in log, "a signed URL is in the log"
    for token in emu.admin("GET", "tokens")["tokens"]:
        assert token not in log


@pytest.mark.mount
def test_listed_sized_and_read_sequentially_and_at_random(emu: Emulator, work: Path) -> None:
    want = lark_bytes(emu)
    assert demo_files(emu)[LARK] == LARK_URI
    with mounted(work, emu, SMALL) as m:
        path = m.org / LARK
        assert "blade_scan.dat" in os.listdir(path.parent)
        assert path.stat().st_size == LARK_SIZE
        emu.reset_stats()
        rnd = random.Random(7)
        fd = os.open(path, os.O_RDONLY)
        try:
            for _ in range(40):
                off = rnd.randrange(0, LARK_SIZE)
                n = rnd.choice([1, 100, 4096, 70_000, 300_000])
                assert os.pread(fd, n, off) == want[off : off + n], (off, n)
            assert os.pread(fd, 10, LARK_SIZE - 3) == want[-3:]
        finally:
            os.close(fd)
        assert path.read_bytes() == want
        stats = emu.stats()
        # One URL served every request: asked for once, not per block.
        assert stats.get("files.getDownloadUrl", 0) == 1
        assert stats["objectstore.get"] > 5
        assert stats.get("files.download", 0) == 0  # never the EnOS download for it
        assert_no_secret_sent_or_logged(emu, m)


@pytest.mark.mount
def test_read_across_url_expiry(emu: Emulator, work: Path) -> None:
    """URLs good for a second, a read spread over several: the URL is renewed as it
    goes (before expiry, or on the object store's 403), and the bytes are right."""
    want = lark_bytes(emu)
    emu.switches(lark_url_lifetime=1.0)
    with mounted(work, emu, SMALL) as m:
        emu.reset_stats()
        got = bytearray()
        with open(m.org / LARK, "rb", buffering=0) as f:
            while chunk := f.read(256 * 1024):
                got += chunk
                time.sleep(0.15)
        assert bytes(got) == want
        stats = emu.stats()
        assert stats.get("files.getDownloadUrl", 0) >= 2
        assert_no_secret_sent_or_logged(emu, m)


@pytest.mark.mount
@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "expired", "match": "objectstore.get", "times": 1},
        {"kind": "error", "status": 403, "match": "objectstore.get", "times": 1},
    ],
    ids=["expired", "403"],
)
def test_read_across_a_refused_url(emu: Emulator, work: Path, fault: dict[str, object]) -> None:
    want = lark_bytes(emu)
    with mounted(work, emu, SMALL) as m:
        known(m.org / LARK)
        emu.reset_stats()
        emu.faults(fault)
        assert (m.org / LARK).read_bytes() == want
        stats = emu.stats()
        assert sum(emu.fired().values()) == fault["times"]
        # Each refusal cost one new URL, not a failed read.
        assert stats.get("files.getDownloadUrl", 0) >= 2
        assert_no_secret_sent_or_logged(emu, m)


@pytest.mark.mount
def test_read_across_503_and_cut_bodies(emu: Emulator, work: Path) -> None:
    want = lark_bytes(emu)
    with mounted(work, emu, '[network]\ntimeout = "10s"\n') as m:
        (m.org / LARK).stat()
        emu.reset_stats()
        emu.faults(
            {"kind": "error", "status": 503, "match": "objectstore.get", "times": 2},
            {"kind": "reset", "after": 300_000, "match": "objectstore.get", "times": 2},
        )
        assert (m.org / LARK).read_bytes() == want
        assert emu.fired().get("reset", 0) == 2 and emu.fired().get("error", 0) == 2
        assert_no_secret_sent_or_logged(emu, m)


@pytest.mark.mount
def test_a_url_refused_for_good_is_eacces_promptly(emu: Emulator, work: Path) -> None:
    with mounted(work, emu, '[network]\ntimeout = "5s"\n') as m:
        (m.org / LARK).stat()
        emu.faults({"kind": "deny", "match": "objectstore.get"})
        began = time.monotonic()
        with pytest.raises(OSError) as info:
            (m.org / LARK).read_bytes()
        assert info.value.errno == errno.EACCES
        assert time.monotonic() - began < 30  # not a hang (far from a speed claim)
        emu.admin("DELETE", "faults")
        assert_no_secret_sent_or_logged(emu, m)


@pytest.mark.mount
def test_sized_by_a_probe_where_getfileinfo_does_not_know_it(emu: Emulator, work: Path) -> None:
    want = lark_bytes(emu)
    emu.switches(lark_file_info=False)
    with mounted(work, emu, SMALL) as m:
        assert (m.org / LARK).stat().st_size == LARK_SIZE
        assert (m.org / LARK).read_bytes() == want
        # Other files are still sized by getFileInfo.
        csv = m.org / "WTG-003/feature/scada_export.csv"
        want_csv = emu.blob(demo_files(emu)["WTG-003/feature/scada_export.csv"])
        assert csv.stat().st_size == len(want_csv)
        assert_no_secret_sent_or_logged(emu, m)


def test_a_generated_organisation_keeps_a_share_in_object_storage(tmp_path: Path) -> None:
    from enosfs.emulator.generate import build_generated, parse_spec

    def uris(spec: str) -> list[str]:
        state = build_generated(parse_spec(spec), tmp_path)
        return [b.uri for b in state.blobs.values() if b.category == "feature"]

    none = uris("generate:devices=50,attrs=2,points=1")
    assert none and not any(u.startswith("enos-lark://") for u in none)
    half = uris("generate:devices=50,attrs=2,points=1,lark=50")
    lark = [u for u in half if u.startswith("enos-lark://")]
    assert 0.3 < len(lark) / len(half) < 0.7
    assert half == uris("generate:devices=50,attrs=2,points=1,lark=50")  # the same ones
