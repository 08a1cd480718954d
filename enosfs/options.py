"""mount(8)-style `-o` options, mapped onto the same settings as the configuration file.

So `enosfs mount -o allow_other,cache_size=2G`, an fstab line and
`mount -t fuse.enosfs` all say the same things the same way. Options that belong to
mount(8), fstab or systemd (_netdev, nofail, noauto, x-systemd.* ...) are understood
and left to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from enosfs.config import Settings, parse_seconds, parse_size, validated
from enosfs.errors import ConfigError

# option -> (Settings field, parser)
_VALUED: dict[str, tuple[str, Any]] = {
    "cache_dir": ("cache_dir", str),
    "cache_size": ("disk_size", parse_size),
    "memory": ("cache_memory", parse_size),
    "block_size": ("block_size", parse_size),
    "metadata_ttl": ("metadata_ttl", parse_seconds),
    "read_ahead": ("read_ahead", parse_size),
    "kernel_read_ahead": ("kernel_read_ahead", parse_size),
    "entry_timeout": ("entry_timeout", parse_seconds),
    "attr_timeout": ("attr_timeout", parse_seconds),
    "timeout": ("timeout", parse_seconds),
    "min_speed": ("min_speed", parse_size),
    "speed_time": ("speed_time", parse_seconds),
}
_FLAGS = {"allow_other": "allow_other", "direct_io": "direct_io"}
# Options for the command itself rather than the settings.
_COMMAND = {"config", "log_file", "log_level", "log_format", "metrics_addr"}
# mount(8), fstab and systemd options: theirs, not ours.
_THEIRS = {
    # mount(8) passes rw unless told ro: the mount is read-only whatever it says.
    "rw",
    "defaults",
    "auto",
    "noauto",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "_netdev",
    "nofail",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "nodiratime",
    "sync",
    "async",
    "ro",
    "default_permissions",
}


@dataclass
class MountOptions:
    settings: dict[str, Any] = field(default_factory=dict)
    command: dict[str, str] = field(default_factory=dict)

    def apply(self, settings: Settings) -> Settings:
        if not self.settings:
            return settings
        return validated(
            replace(settings, **self.settings), read_ahead_given="read_ahead" in self.settings
        )


def parse_options(groups: list[str]) -> MountOptions:
    """Options from one or more -o strings; a clear ConfigError for anything unknown."""
    out = MountOptions()
    for group in groups:
        for item in filter(None, (p.strip() for p in group.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if name in _THEIRS or name.startswith(("x-", "comment=")):
                continue
            if name in _FLAGS:
                out.settings[_FLAGS[name]] = True
                continue
            if name in _VALUED or name in _COMMAND:
                if not sep or not value:
                    raise ConfigError(f"-o {name} needs a value: {name}=...")
                if name in _COMMAND:
                    out.command[name] = value
                else:
                    key, parse = _VALUED[name]
                    out.settings[key] = parse(value) if parse is str else parse(value, f"-o {name}")
                continue
            raise ConfigError(f"unknown mount option '{name}'")
    return out
