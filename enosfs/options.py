"""mount(8)-style `-o` options, mapped onto the same settings as the configuration file.

So `enosfs mount -o allow_other,cache_size=2G`, an fstab line and
`mount -t fuse.enosfs` all say the same things the same way. Options that belong to
mount(8), fstab or systemd (_netdev, nofail, noauto, x-systemd.* ...) are understood
and left to them. Which settings have a -o name is said in settings_schema.SCHEMA.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from enosfs.config import Settings, validated
from enosfs.errors import ConfigError
from enosfs.settings_schema import BY_OPTION, SCHEMA, Kind

# Options for the command itself rather than the settings.
_COMMAND = {
    "config": ("FILE", "the configuration file, as --config"),
    "log_file": ("FILE", "write the log here, as --log-file"),
    "log_level": ("LEVEL", "debug, info, warning or error, as --log-level"),
    "log_format": ("FORMAT", "text or json, as --log-format"),
    "metrics_addr": ("HOST:PORT", "serve Prometheus metrics here, as --metrics-addr"),
}
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
            setting = BY_OPTION.get(name)
            if setting is not None and setting.kind is Kind.BOOL:
                out.settings[setting.field] = True
                continue
            if setting is not None or name in _COMMAND:
                if not sep or not value:
                    raise ConfigError(f"-o {name} needs a value: {name}=...")
                if setting is None:
                    out.command[name] = value
                else:
                    out.settings[setting.field] = setting.parse_option(value)
                continue
            raise ConfigError(f"unknown mount option '{name}'")
    return out


def describe_options() -> str:
    """The -o options for `enosfs mount --help`, from the settings schema."""
    lines = ["-o options (those of mount(8), fstab and systemd are accepted and left to them):"]
    for name, (metavar, meaning) in _COMMAND.items():
        lines += [f"  {name}={metavar}", f"      {meaning}"]
    for s in SCHEMA:
        if s.option is None:
            continue
        shown = s.option if s.kind is Kind.BOOL else f"{s.option}={s.kind.value}"
        lines += [f"  {shown}  ({s.key}, default {s.shown_default})", f"      {s.help}"]
    return "\n".join(lines)
