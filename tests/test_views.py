"""by-name/ and by-key/: folders of links named the way people know their devices
(views.py), through real mounts of an emulator whose devices have clashing and hostile
names."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enosfs.api import FileRef
from enosfs.config import SECRET_ENV, ConfigError, settings_from_dict
from enosfs.emulator.demo import DEMO_APP_KEY, DEMO_APP_SECRET, DEMO_ORG
from enosfs.metastore import MetaStore
from enosfs.views import Known, by_key, by_name
from tests.support import Emulator, emulator, enosfs, mounted, run

LONG_NAME = "Nacelle " * 40  # 320 bytes
# asset id, deviceName, productKey, deviceKey. Newest first in device search (their
# createTime falls down the list), so search order is not asset id order.
DEVICES = [
    ("b2", "Pump", "pkPump", "pump-b"),
    ("a1", "Pump", "pkPump", "pump-a"),
    ("c3", "a/b", "pkPump", "k/1"),
    ("c4", "a_b", "pkPump", "k_1"),
    ("d1", "..", "pk/odd", "d1"),
    ("d2", ".", "pk/odd", "d2"),
    ("d3", "", "pk/odd", "d3"),
    ("d4", "   ", "pk/odd", "d4"),
    ("d5", LONG_NAME, "pk/odd", "d5"),
    ("d6", "bad\x00\x1b[31mname\u202e", "pk/odd", "d6"),
    ("d7", "by-name", "pk/odd", "d7"),
    ("d8", "by-key", "pk/odd", "d8"),
    ("by-name", "Odd id", "pk/odd", "odd"),
    ("e1", "WTG-017 Nacelle", "pkPump", "wtg-017"),
]
# The names each asset is expected under, by-name/ and by-key/ (None: no link).
NAMED = {
    "a1": "Pump",  # the lower asset id keeps the name, whatever order search gives
    "b2": "Pump~2",
    "c4": "a_b",  # already safe: keeps it
    "c3": "a_b~2",
    "d1": "__",
    "d2": "_",
    "d3": None,
    "d4": None,
    "d6": "bad__[31mname_",
    "d7": "by-name",
    "d8": "by-key",
    "by-name": "Odd id",
    "e1": "WTG-017 Nacelle",
}
FOLDER = {"by-name": "by-name~2"}  # an asset whose id is a view's name


def device(i: int, asset: str, name: str, product: str, key: str) -> dict[str, Any]:
    return {
        "assetId": asset,
        "name": name,
        "productKey": product,
        "deviceKey": key,
        "createTime": 1_700_000_000_000 - i * 1000,
        "attributes": {"manual": {"text": f"manual of {asset}\n", "name": "manual.txt"}},
    }


def seed() -> dict[str, Any]:
    return {
        "apps": [{"appKey": DEMO_APP_KEY, "appSecret": DEMO_APP_SECRET}],
        "orgs": [
            {
                "orgId": DEMO_ORG,
                "models": [{"modelId": "m", "attributes": {"manual": "FILE"}}],
                "products": [
                    {"productKey": "pkPump", "modelId": "m"},
                    {"productKey": "pk/odd", "modelId": "m"},
                ],
                "devices": [device(i, *d) for i, d in enumerate(DEVICES)],
            }
        ],
    }


@pytest.fixture(scope="module")
def views_emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    where = tmp_path_factory.mktemp("views-seed")
    (where / "seed.json").write_text(json.dumps(seed()))
    with emulator(tmp_path_factory.mktemp("views-data"), str(where / "seed.json")) as emu:
        yield emu


@pytest.fixture
def vemu(views_emu: Emulator) -> Iterator[Emulator]:
    views_emu.reset_stats()
    yield views_emu
    views_emu.admin("DELETE", "faults")


def api_calls(emu: Emulator) -> dict[str, int]:
    return {
        k: v
        for k, v in emu.stats().items()
        if v and not k.startswith("token.") and k != "connections"
    }


def manual(folder: Path) -> str:
    return (folder / "feature" / "manual.txt").read_text()


# -- names, without a mount --------------------------------------------------------------


def test_names_depend_on_the_devices_not_on_their_order() -> None:
    known = [Known(a, n, p, k) for a, n, p, k in DEVICES]
    assert by_name(known) == by_name(list(reversed(known)))
    assert by_key(known) == by_key(list(reversed(known)))
    got = {a: n for n, a in by_name(known).items()}
    long = got.pop("d5")
    assert long.startswith("Nacelle Nacelle") and len(long.encode()) <= 255
    assert got == {a: n for a, n in NAMED.items() if n is not None}
    assert {n: k.asset_id for n, k in by_key(known)["pkPump"].items()} == {
        "pump-a": "a1",
        "pump-b": "b2",
        "k_1": "c4",
        "k_1~2": "c3",
        "wtg-017": "e1",
    }


def test_a_device_without_keys_or_name_gets_no_link() -> None:
    known = [Known("x1", "", "", "k"), Known("x2", "two", "p", "")]
    assert by_name(known) == {"two": "x2"}
    assert by_key(known) == {}


# -- through a mount ---------------------------------------------------------------------


@pytest.mark.mount
def test_links_lead_to_the_right_assets(vemu: Emulator, work: Path) -> None:
    with mounted(work, vemu) as m:
        org = m.org
        assert {"by-name", "by-key", "by-name~2"} <= set(os.listdir(org))
        for asset, name in NAMED.items():
            folder = FOLDER.get(asset, asset)
            assert manual(org / folder) == f"manual of {asset}\n"
            if name is None:
                continue
            link = org / "by-name" / name
            st = os.lstat(link)
            assert stat.S_ISLNK(st.st_mode)
            assert os.readlink(link) == f"../{folder}"
            assert st.st_size == len(os.readlink(link).encode())
            assert os.path.realpath(link) == os.path.realpath(org / folder)
            assert manual(link) == f"manual of {asset}\n"
        for product in {d[2] for d in DEVICES}:
            assert os.path.isdir(org / "by-key" / product.replace("/", "_"))
        link = org / "by-key" / "pkPump" / "pump-a"
        assert os.readlink(link) == "../../a1"
        assert os.path.realpath(link) == os.path.realpath(org / "a1")
        assert manual(org / "by-key" / "pk_odd" / "odd") == "manual of by-name\n"
        # Every name a folder can hold; nothing for a device without a name.
        listed = os.listdir(org / "by-name")
        assert len(listed) == len([n for n in NAMED.values() if n]) + 1  # + the long one
        for name in listed:
            assert "/" not in name and name not in (".", "..") and len(name.encode()) <= 255
            assert name.isprintable(), repr(name)
        # cd follows the link; ls -l shows it as one.
        out = run("sh", "-c", 'cd "$1" && ls feature && pwd -P', "sh", org / "by-name" / "Pump")
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines() == ["manual.txt", os.path.realpath(org / "a1")]
        out = run("ls", "-l", org / "by-name")
        assert out.returncode == 0, out.stderr
        assert "Pump~2 -> ../b2" in out.stdout and out.stdout.count(" -> ") == len(listed)
        # Reading through the link is reading the file: no link is a file of its own.
        with pytest.raises(OSError):
            os.open(org / "by-name" / "Pump", os.O_RDONLY | os.O_NOFOLLOW)


@pytest.mark.mount
def test_the_views_cost_no_call_of_their_own(vemu: Emulator, work: Path) -> None:
    with mounted(work, vemu) as m:
        os.listdir(m.org)
        listing = api_calls(vemu)
        assert listing.get("devices.search", 0) >= 1
        vemu.reset_stats()
        for root, dirs, files in os.walk(m.org / "by-key"):
            for name in dirs + files:
                os.lstat(os.path.join(root, name))
        for name in os.listdir(m.org / "by-name"):
            os.readlink(m.org / "by-name" / name)
        assert api_calls(vemu) == {}


@pytest.mark.mount
def test_a_plain_find_lists_each_file_once(vemu: Emulator, work: Path) -> None:
    with mounted(work, vemu) as m:
        found = run("find", m.org)
        assert found.returncode == 0, found.stderr
        lines = found.stdout.splitlines()
        assert len(lines) == len(set(lines))
        files = run("find", m.org, "-type", "f").stdout.splitlines()
        assert sorted(files) == sorted(
            str(m.org / FOLDER.get(a, a) / "feature" / "manual.txt") for a, *_ in DEVICES
        )
        links = run("find", m.org, "-type", "l").stdout.splitlines()
        assert len(links) == len(os.listdir(m.org / "by-name")) + len(DEVICES)
        # find -L reaches the same files through the links, and no loop.
        followed = run("find", "-L", m.org, "-type", "f")
        assert followed.returncode == 0, followed.stderr
        reached = {os.path.realpath(p) for p in followed.stdout.splitlines()}
        assert reached == {os.path.realpath(p) for p in files}
        # enosfs warm does not walk an asset twice either.
        out = enosfs("warm", m.org)
        assert out.returncode == 0, out.stderr
        assert f", {len(DEVICES)} files in " in out.stdout, out.stdout


@pytest.mark.mount
def test_no_views_where_device_search_is_denied(vemu: Emulator, work: Path) -> None:
    vemu.faults({"kind": "deny", "match": "devices.search"})
    with mounted(work, vemu, 'assets = ["c3"]\n') as m:
        assert os.listdir(m.org) == ["c3"]  # only what the configuration names
        vemu.reset_stats()
        assert not os.path.exists(m.org / "by-name")
        assert not os.path.exists(m.org / "by-key")
        assert api_calls(vemu) == {}  # the names mean the views or nothing: not asked
        # An asset named by its id still opens.
        assert manual(m.org / "a1") == "manual of a1\n"


@pytest.mark.mount
def test_a_remount_shows_the_views_from_the_store_with_no_call(vemu: Emulator, work: Path) -> None:
    config = f'[cache]\ndir = "{work / "cache"}"\n'
    with mounted(work, vemu, config) as m:
        before = run("ls", "-lR", m.org)
        assert before.returncode == 0 and " -> ../a1" in before.stdout
    with mounted(work, vemu, config) as m:
        vemu.reset_stats()
        assert os.readlink(m.org / "by-name" / "Pump") == "../a1"
        assert os.readlink(m.org / "by-key" / "pkPump" / "pump-b") == "../../b2"
        assert sorted(os.listdir(m.org / "by-key")) == ["pkPump", "pk_odd"]
        assert api_calls(vemu) == {}


async def test_the_store_keeps_what_search_said(tmp_path: Path) -> None:
    known = [Known(a, n, p, k) for a, n, p, k in DEVICES]
    store = await MetaStore.open(tmp_path)
    assert store is not None
    store.save_assets("o1", ["a1"], 1000.0, known)
    store.save_assets("o2", ["x"], 1000.0, None)  # search denied: no views
    await store.close()
    store = await MetaStore.open(tmp_path)
    assert store is not None
    one, two = await store.load("o1"), await store.load("o2")
    await store.close()
    assert one.known == known and two.known is None


# -- a device known by its keys alone ----------------------------------------------------


def test_a_file_ref_names_a_device_by_its_keys_where_there_is_no_asset_id() -> None:
    by_id = FileRef("o1", "a1", "feature", "enos-connect://x.txt", "pk", "dk")
    assert by_id.params()["assetId"] == "a1" and "productKey" not in by_id.params()
    keyed = FileRef("o1", "", "feature", "enos-connect://x.txt", "pk", "dk")
    assert keyed.params() == {
        "orgId": "o1",
        "productKey": "pk",
        "deviceKey": "dk",
        "category": "feature",
        "fileUri": "enos-connect://x.txt",
    }


@pytest.mark.parametrize(
    "device, error",
    [
        ('product_key = "pk"\ndevice_key = "dk"\n', None),
        ('asset = "a"\nproduct_key = "pk"\ndevice_key = "dk"\n', "by asset, or by product_key"),
        ('product_key = "pk"\n', "by asset, or by product_key"),
        ("", "by asset, or by product_key"),
    ],
)
def test_a_configured_file_names_its_device_by_asset_or_by_keys(
    device: str, error: str | None
) -> None:
    raw = {
        "enos": {"gateway": "https://gw.example", "app_key": "k"},
        "org": [{"id": "o1"}],
        "file": [{"org": "o1", "uri": "enos-connect://x.txt", **tomllib.loads(device)}],
    }
    if error is None:
        f = settings_from_dict(raw, {SECRET_ENV: "s"}).files[0]
        assert (f.asset, f.product_key, f.device_key) == ("", "pk", "dk")
    else:
        with pytest.raises(ConfigError, match=error):
            settings_from_dict(raw, {SECRET_ENV: "s"})


def keyed_file(emu: Emulator, asset: str, product: str, key: str) -> tuple[str, str]:
    """A [[file]] naming asset's manual by its device's keys, and that manual's fileUri."""
    uri = next(u for u in emu.blobs() if emu.blob(u) == f"manual of {asset}\n".encode())
    config = (
        f'[[file]]\norg = "{emu.org}"\nproduct_key = "{product}"\ndevice_key = "{key}"\n'
        f'uri = "{uri}"\nname = "from-config.txt"\n'
    )
    return config, uri


@pytest.mark.mount
def test_a_device_known_by_its_keys_alone_is_reached_by_them(vemu: Emulator, work: Path) -> None:
    """Search denied: no asset id to go by. Its configured file is in by-key/, and read
    with productKey+deviceKey in every call (an empty assetId would be refused)."""
    config, uri = keyed_file(vemu, "a1", "pkPump", "pump-a")
    vemu.faults({"kind": "deny", "match": "devices.search"})
    with mounted(work, vemu, config) as m:
        assert os.listdir(m.org) == ["by-key"]
        folder = m.org / "by-key" / "pkPump" / "pump-a"
        assert not os.path.islink(folder) and os.path.isdir(folder)
        path = folder / "feature" / "from-config.txt"
        assert path.stat().st_size == len(vemu.blob(uri))
        assert path.read_bytes() == vemu.blob(uri)
        assert os.getxattr(path, "user.enos.device_key") == b"pump-a"
        # Named by its fileUri's id too, though no listing shows it that way.
        assert (folder / "feature" / uri.split("://")[1]).read_bytes() == vemu.blob(uri)


@pytest.mark.mount
def test_a_device_configured_by_keys_that_search_finds_is_its_asset(
    vemu: Emulator, work: Path
) -> None:
    config, uri = keyed_file(vemu, "a1", "pkPump", "pump-a")
    with mounted(work, vemu, config) as m:
        assert (m.org / "a1" / "feature" / "from-config.txt").read_bytes() == vemu.blob(uri)
        assert os.readlink(m.org / "by-key" / "pkPump" / "pump-a") == "../../a1"
