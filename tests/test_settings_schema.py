"""Layer 1: the settings schema is the one description of every tunable setting, so the
file, the -o options, `enosfs mount --help` and the README's table all agree with it."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from enosfs.cli import parser
from enosfs.config import SECRET_ENV, Secret, Settings, settings_from_dict
from enosfs.options import parse_options
from enosfs.settings_schema import SCHEMA, SECTIONS, Kind, Setting

README = Path(__file__).resolve().parent.parent / "README.md"
BASE: dict[str, Any] = {
    "enos": {"gateway": "http://gw.example", "app_key": "k"},
    "org": [{"id": "o"}],
}


def readme_table() -> dict[str, str]:
    """Key -> its default cell, from the README's `| key | default | meaning |` table."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("| key | default | meaning |")
    rows: dict[str, str] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        keys, shown = (c.strip() for c in line.strip("|").split(" | ")[:2])
        for key in re.findall(r"`([^`]+)`", keys):
            rows[key] = shown
    return rows


def test_the_readme_table_lists_every_setting_with_its_default() -> None:
    rows = {k: v for k, v in readme_table().items() if k.partition(".")[0] in SECTIONS}
    assert sorted(rows) == sorted(s.key for s in SCHEMA)
    for s in SCHEMA:
        shown = s.shown_default if s.default is None else f"`{s.shown_default}`"
        cell = rows[s.key]
        assert cell == shown or cell.startswith(f"{shown} "), f"{s.key}: README says {cell}"


def test_settings_defaults_are_the_schemas() -> None:
    names = {f.name for f in fields(Settings)}
    plain = Settings(gateway="http://gw.example", app_key="k", app_secret=Secret("s"), orgs=())
    for s in SCHEMA:
        assert s.field in names, s.key
        assert getattr(plain, s.field) == s.default_value, s.key


def test_every_default_written_in_the_file_reads_back_as_the_default() -> None:
    raw: dict[str, Any] = dict(BASE)
    for s in SCHEMA:
        if s.default is not None:
            raw.setdefault(s.section, {})[s.name] = s.default
    got = settings_from_dict(raw, {SECRET_ENV: "s"})
    for s in SCHEMA:
        assert getattr(got, s.field) == s.default_value, s.key


def test_paths_are_relative_to_the_configuration_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    raw = {**BASE, "cache": {"dir": "blocks"}, "network": {"ca_bundle": "ca.pem"}}
    got = settings_from_dict(raw, {SECRET_ENV: "s"}, base_dir=tmp_path)
    assert got.cache_dir == str((tmp_path / "blocks").resolve())
    assert got.ca_bundle == str(tmp_path / "ca.pem")


@pytest.mark.parametrize("setting", [s for s in SCHEMA if s.option], ids=lambda s: s.key)
def test_each_o_option_sets_its_setting(setting: Setting) -> None:
    assert setting.option is not None
    if setting.kind is Kind.BOOL:
        assert parse_options([setting.option]).settings == {setting.field: True}
    elif setting.default is None:
        got = parse_options([f"{setting.option}=/some/where"]).settings
        assert got == {setting.field: "/some/where"}
    else:
        got = parse_options([f"{setting.option}={setting.default}"]).settings
        assert got == {setting.field: setting.default_value}


def test_mount_help_lists_every_o_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["mount", "--help"])
    text = capsys.readouterr().out
    for s in SCHEMA:
        if s.option:
            assert re.search(rf"^  {s.option}\b.*\({re.escape(s.key)}, default", text, re.M), s.key
    for name in ("config", "log_file", "log_level", "log_format", "metrics_addr"):
        assert re.search(rf"^  {name}=", text, re.M), name
