"""Values as people write them in a configuration file or a `-o` option.

Sizes ('512MiB'), durations ('30s'), shares ('5%'), switches and names: each parser
takes `where` (the key or the option) so that a mistake becomes one ConfigError line
that says which setting is wrong, whichever way it was given.
"""

from __future__ import annotations

import re
from typing import Any

from enosfs.errors import ConfigError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_TIME_UNITS = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_size(value: object, where: str) -> int:
    """Bytes from an int or a string such as '512MiB', '4M', '1.5GiB'."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a size such as 512MiB, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{where} must not be negative")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ConfigError(f"{where} must be a size such as 512MiB, not {value!r}")


def parse_seconds(value: object, where: str) -> float:
    """Seconds from a number or a string such as '30s', '500ms', '5m'."""
    if isinstance(value, bool):
        raise ConfigError(f"{where} must be a duration such as 30s, not {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ConfigError(f"{where} must not be negative")
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", value)
        if m and m.group(2) in _TIME_UNITS:
            return float(m.group(1)) * _TIME_UNITS[m.group(2)]
    raise ConfigError(f"{where} must be a duration such as 30s, not {value!r}")


def parse_share(value: object, where: str) -> float:
    """A share of something: '5%' or 0.05."""
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?\s*%\s*", value):
        value = float(value.strip()[:-1]) / 100
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1:
        return float(value)
    raise ConfigError(f"{where} must be a share such as '5%' or 0.05, not {value!r}")


def parse_bool(value: object, where: str) -> bool:
    """TOML's own true or false: 'yes' or 1 is refused, not guessed at."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false")
    return value


def parse_int(value: object, where: str, low: int, high: int) -> int:
    """An integer within bounds (a TOML bool is not one, though Python says it is)."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{where} must be an integer from {low} to {high}")
    return value


def parse_text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string")
    return value


def check_table(value: object, where: str, allowed: set[str]) -> dict[str, Any]:
    """A TOML table holding only keys we know: a typo such as `memroy` is named, never
    silently ignored."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(value) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        hint = ", ".join(sorted(allowed))
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known here: {hint})")
    return value
