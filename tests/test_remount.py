"""Metadata kept across a remount (metastore.py), through real mounts and the emulator."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from enosfs.metastore import FILE_NAME
from tests.support import Emulator, demo_files, emulator, enosfs, mounted, run, stats_of

pytestmark = pytest.mark.mount


def listing_calls(emu: Emulator) -> dict[str, int]:
    """Every API call a walk could cost: all but the token's (which a walk never asks
    for, but whose refresh is the token task's business). Connections are not calls:
    the test's own admin requests open some."""
    return {
        k: v
        for k, v in emu.stats().items()
        if v and not k.startswith("token.") and k != "connections"
    }


def walk(org: Path) -> tuple[str, str]:
    found = run("find", org, "-type", "f")
    listed = run("ls", "-lR", org)
    assert found.returncode == 0 and listed.returncode == 0, found.stderr + listed.stderr
    return found.stdout, listed.stdout


def cache_config(work: Path, ttl: str = "") -> str:
    extra = f'metadata_ttl = "{ttl}"\n' if ttl else ""
    return f'[cache]\ndir = "{work / "cache"}"\n{extra}'


def test_a_remount_walks_the_org_with_no_call(emu: Emulator, work: Path) -> None:
    with mounted(work, emu, cache_config(work)) as m:
        before = walk(m.org)
    assert before[0].count("\n") == len(demo_files(emu))
    with mounted(work, emu, cache_config(work)) as m:
        emu.reset_stats()
        after = walk(m.org)
        assert listing_calls(emu) == {}
        kept = stats_of(m.path)["metadata_store"]
        assert kept["enabled"] and kept["loaded"] >= len(demo_files(emu)), kept
    assert after == before


def test_a_file_changed_while_unmounted_is_seen_after_the_ttl(
    work: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The store still holds the old size and digest: past the TTL they are asked for
    again before stat or open, and the old version's blocks go."""
    with emulator(tmp_path_factory.mktemp("changed-data")) as emu:
        rel = "WTG-001/feature/vibration_raw.bin"
        uri = demo_files(emu)[rel]
        old = emu.blob(uri)
        config = cache_config(work, "1s") + '[kernel]\nattr_timeout = "1s"\nentry_timeout = "1s"\n'
        with mounted(work, emu, config) as m:
            assert (m.org / rel).read_bytes() == old
        emu.replace_feature(
            "WTG-001", "vibration_raw", bytes=len(old) + 4096, seed="v2", keep_uri=True
        )
        new = emu.blob(uri)
        time.sleep(1.2)  # what the store holds is past its TTL now
        with mounted(work, emu, config) as m:
            assert (m.org / rel).stat().st_size == len(new)
            assert hashlib.md5((m.org / rel).read_bytes()).digest() == hashlib.md5(new).digest()
        assert "changed on the server" in m.log_text()


def test_a_refresh_reaches_the_store_so_a_remount_asks_again(
    work: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Within the TTL the store's records would be served at a remount: a refresh
    drops those of its subtree, so the remount shows the files as they are now, while
    what the refresh did not name still costs no call."""
    with emulator(tmp_path_factory.mktemp("refresh-store-data")) as emu:
        same_uri = "WTG-002/feature/scada_export.csv"
        new_uri = "WTG-002/feature/model_file.json"
        config = cache_config(work, "1h")
        with mounted(work, emu, config) as m:
            walk(m.org)  # every listing and record in the store
            old = (m.org / new_uri).read_bytes()
            feature = {"orgId": emu.org, "assetId": "WTG-002"}
            new_text = "time,power\n0,1\n"
            emu.admin(
                "POST",
                "replace",
                {
                    **feature,
                    "feature": "scada_export",
                    "kind": "measurepoints",
                    "text": new_text,
                    "keep_uri": True,
                },
            )
            emu.admin(
                "POST",
                "replace",
                {**feature, "feature": "model_file", "text": '{"v": 2}\n', "name": "v2.json"},
            )
            out = enosfs("refresh", m.org / "WTG-002")
            assert out.returncode == 0, out.stderr
            # Nothing asked again here: the remount alone must see the change.
        with mounted(work, emu, config) as m:
            emu.reset_stats()
            assert os.listdir(m.org / "WTG-001" / "feature")
            assert listing_calls(emu) == {}
            assert (m.org / same_uri).stat().st_size == len(new_text)
            assert (m.org / same_uri).read_bytes() == new_text.encode()
            assert (m.org / new_uri).read_bytes() == b'{"v": 2}\n' != old


def test_a_garbage_store_is_said_once_and_the_mount_lists_from_the_network(
    emu: Emulator, work: Path
) -> None:
    (work / "cache").mkdir()
    (work / "cache" / FILE_NAME).write_bytes(os.urandom(20_000))
    emu.reset_stats()
    with mounted(work, emu, cache_config(work)) as m:
        found, _ = walk(m.org)
        assert found.count("\n") == len(demo_files(emu))
        assert listing_calls(emu)
    said = [line for line in m.log_text().splitlines() if "metadata store" in line]
    assert len(said) == 1 and "damaged" in said[0] and "starting afresh" in said[0], said
