"""Every tunable setting ([cache], [kernel], [network]), declared once.

The configuration file, the `-o` mount options, `enosfs mount --help`, the defaults of
`config.Settings` and the README's table are all read from SCHEMA (the README by a
test), so a setting cannot be known to one of them and missing from another, nor be
parsed two ways. The [enos], [[org]] and [[file]] tables say who and what, not how, and
are parsed by hand in config.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from enosfs.errors import ConfigError
from enosfs.values import (
    check_table,
    parse_bool,
    parse_int,
    parse_seconds,
    parse_share,
    parse_size,
    parse_text,
)


class Kind(Enum):
    """How a value is written; the value of each member is its placeholder in --help."""

    SIZE = "SIZE"
    SECONDS = "DURATION"
    SHARE = "SHARE"
    BOOL = "BOOL"
    INT = "N"
    FOLDER = "DIR"  # relative to the configuration file; need not exist yet
    FILE = "FILE"  # relative to the configuration file; must exist


@dataclass(frozen=True)
class Setting:
    key: str  # section.name in the configuration file
    field: str  # the config.Settings attribute it sets
    kind: Kind
    # The default as a user would write it in the file (so the README can show it as
    # is); None: unset, which `unset` describes.
    default: str | int | bool | None
    help: str  # one line, for --help
    option: str | None = None  # its name as a -o mount option, if it has one
    bounds: tuple[int, int] = (0, 0)  # for Kind.INT: lowest and highest
    unset: str = "none"

    @property
    def section(self) -> str:
        return self.key.partition(".")[0]

    @property
    def name(self) -> str:
        return self.key.partition(".")[2]

    def parse(self, value: object, where: str, base_dir: Path = Path(".")) -> Any:
        """The runtime value of what the file (or an option) says, or a ConfigError."""
        match self.kind:
            case Kind.SIZE:
                return parse_size(value, where)
            case Kind.SECONDS:
                return parse_seconds(value, where)
            case Kind.SHARE:
                return parse_share(value, where)
            case Kind.BOOL:
                return parse_bool(value, where)
            case Kind.INT:
                return parse_int(value, where, *self.bounds)
            case Kind.FOLDER:
                d = Path(parse_text(value, where)).expanduser()
                return str(d if d.is_absolute() else (base_dir / d).resolve())
            case Kind.FILE:
                f = Path(parse_text(value, where)).expanduser()
                if not f.is_absolute():
                    f = base_dir / f
                if not f.is_file():
                    raise ConfigError(f"{where} {f} is not a file")
                return str(f)

    def parse_option(self, value: str) -> Any:
        """The value of `-o NAME=VALUE`. A path is taken as given: mount(8) and fstab
        have no configuration file for it to be relative to."""
        if self.kind in (Kind.FOLDER, Kind.FILE):
            return value
        if self.kind is Kind.INT and value.strip().isdigit():
            # An option is always text; the file's TOML gives a number its own type.
            return self.parse(int(value), f"-o {self.option}")
        return self.parse(value, f"-o {self.option}")

    @property
    def default_value(self) -> Any:
        return None if self.default is None else self.parse(self.default, self.key)

    @property
    def shown_default(self) -> str:
        """The default as the README and --help show it."""
        if self.default is None:
            return self.unset
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        return str(self.default)


SCHEMA: tuple[Setting, ...] = (
    Setting(
        "cache.memory",
        "cache_memory",
        Kind.SIZE,
        "512MiB",
        "one budget for all file blocks: cached, read ahead, spare",
        option="memory",
    ),
    Setting(
        "cache.block_size",
        "block_size",
        Kind.SIZE,
        "1MiB",
        "download and cache granularity (a power of two, 4KiB to 64MiB)",
        option="block_size",
    ),
    Setting(
        "cache.metadata_ttl",
        "metadata_ttl",
        Kind.SECONDS,
        "60s",
        "how long listings and file sizes are trusted",
        option="metadata_ttl",
    ),
    Setting(
        "cache.negative_ttl",
        "negative_ttl",
        Kind.SECONDS,
        "5s",
        "how long a name found missing stays missing, here and in the kernel",
        option="negative_ttl",
    ),
    Setting(
        "cache.read_ahead",
        "read_ahead",
        Kind.SIZE,
        "64MiB",
        "largest read-ahead window of one reader (default at most a quarter of memory)",
        option="read_ahead",
    ),
    Setting(
        "cache.first_bytes",
        "first_bytes",
        Kind.SIZE,
        "128KiB",
        "asked for beside the size of a file named on its own, for its first read (0: never)",
        option="first_bytes",
    ),
    Setting(
        "cache.dir",
        "cache_dir",
        Kind.FOLDER,
        None,
        "keep blocks and metadata on disk here too, across remounts",
        option="cache_dir",
    ),
    Setting(
        "cache.disk_size",
        "disk_size",
        Kind.SIZE,
        "10GiB",
        "the disk cache's size",
        option="cache_size",
    ),
    Setting(
        "cache.min_free",
        "min_free",
        Kind.SHARE,
        "5%",
        "free space the disk cache leaves on its disk",
    ),
    Setting(
        "kernel.entry_timeout",
        "entry_timeout",
        Kind.SECONDS,
        "10s",
        "how long the kernel may cache names",
        option="entry_timeout",
    ),
    Setting(
        "kernel.attr_timeout",
        "attr_timeout",
        Kind.SECONDS,
        "10s",
        "how long the kernel may cache sizes and times",
        option="attr_timeout",
    ),
    Setting(
        "kernel.allow_other",
        "allow_other",
        Kind.BOOL,
        False,
        "let other users see the mount (needs user_allow_other in /etc/fuse.conf)",
        option="allow_other",
    ),
    Setting(
        "kernel.read_ahead",
        "kernel_read_ahead",
        Kind.SIZE,
        "2MiB",
        "the kernel's own read-ahead on this mount (root only; 0: the kernel's default)",
        option="kernel_read_ahead",
    ),
    Setting(
        "kernel.direct_io",
        "direct_io",
        Kind.BOOL,
        False,
        "bypass the kernel page cache (no mmap of files)",
        option="direct_io",
    ),
    Setting(
        "network.timeout",
        "timeout",
        Kind.SECONDS,
        "30s",
        "deadline of one network call, retries included",
        option="timeout",
    ),
    Setting(
        "network.connect_timeout",
        "connect_timeout",
        Kind.SECONDS,
        "10s",
        "TCP/TLS connect deadline",
    ),
    Setting(
        "network.retries",
        "retries",
        Kind.INT,
        7,
        "most retries of one call, within its deadline",
        bounds=(0, 100),
    ),
    Setting(
        "network.max_connections",
        "max_connections",
        Kind.INT,
        96,
        "HTTP connections open at once",
        bounds=(1, 1024),
    ),
    Setting(
        "network.max_api_concurrency",
        "max_api_concurrency",
        Kind.INT,
        64,
        "most API calls (not file bodies) in flight at once; fewer while the gateway says 429",
        option="max_api_concurrency",
        bounds=(1, 1024),
    ),
    Setting(
        "network.ca_bundle",
        "ca_bundle",
        Kind.FILE,
        None,
        "a private CA bundle (TLS is always verified)",
        unset="system CAs",
    ),
    Setting(
        "network.token_refresh_margin",
        "token_refresh_margin",
        Kind.SECONDS,
        "10m",
        "renew the access token this long before it expires",
    ),
    Setting(
        "network.min_speed",
        "min_speed",
        Kind.SIZE,
        "8KiB",
        "a download slower than this a second for speed_time is resumed anew (0: off)",
        option="min_speed",
    ),
    Setting(
        "network.speed_time",
        "speed_time",
        Kind.SECONDS,
        "10s",
        "the window min_speed is measured over",
        option="speed_time",
    ),
)

SECTIONS = ("cache", "kernel", "network")
BY_FIELD = {s.field: s for s in SCHEMA}
BY_OPTION = {s.option: s for s in SCHEMA if s.option}


def default(field: str) -> Any:
    """A config.Settings field's default, from its declaration here."""
    return BY_FIELD[field].default_value


def parse_sections(top: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Settings field -> value, for each key the file's [cache], [kernel] and [network]
    tables give; a ConfigError for an unknown key or a bad value."""
    out: dict[str, Any] = {}
    for section in SECTIONS:
        declared = [s for s in SCHEMA if s.section == section]
        table = check_table(top.get(section, {}), section, {s.name for s in declared})
        for s in declared:
            if s.name in table:
                out[s.field] = s.parse(table[s.name], s.key, base_dir)
    return out
