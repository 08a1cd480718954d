"""Settings: a TOML file plus the environment, checked before anything is mounted.

Every mistake becomes one ConfigError line that names the file and the key, because a
user who typed `memroy` wants to be told so, not to get a silently ignored setting.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
import unicodedata
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from enosfs.errors import ConfigError
from enosfs.naming import NAME_MAX, safe_name

SECRET_ENV = "ENOSFS_APP_SECRET"
_SECRET_FILE_MAX = 64 * 1024
CATEGORIES = ("feature", "ota")

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


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


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


@dataclass(frozen=True)
class FileRef:
    """A file named in the configuration: shown even where no listing API finds it."""

    org: str
    asset: str
    category: str
    uri: str
    name: str | None = None


@dataclass(frozen=True)
class OrgSettings:
    org_id: str
    assets: tuple[str, ...] = ()
    discover: bool = True


@dataclass(frozen=True)
class Settings:
    gateway: str
    app_key: str
    app_secret: Secret
    orgs: tuple[OrgSettings, ...]
    integration: str = ""
    files: tuple[FileRef, ...] = ()
    # Where the secret came from, so a rotated secret can be read again; None: from
    # the environment.
    app_secret_file: str | None = None
    # [cache]
    cache_memory: int = 512 * 1024**2
    block_size: int = 1024**2
    metadata_ttl: float = 60.0
    read_ahead: int = 64 * 1024**2
    cache_dir: str | None = None  # the disk cache's folder; None: no disk cache
    disk_size: int = 10 * 1024**3
    min_free: float = 0.05  # the disk cache keeps this share of its disk free
    # [kernel]
    entry_timeout: float = 10.0
    attr_timeout: float = 10.0
    allow_other: bool = False
    kernel_read_ahead: int = 2 * 1024**2  # 0: leave the kernel's default
    direct_io: bool = False
    # [network]
    timeout: float = 30.0
    connect_timeout: float = 10.0
    ca_bundle: str | None = None
    max_connections: int = 32
    retries: int = 7
    token_refresh_margin: float = 600.0
    # A body slower than min_speed bytes/s for speed_time seconds is dropped and resumed
    # on a new connection (curl's --speed-limit/--speed-time); 0 turns this off.
    min_speed: int = 8 * 1024
    speed_time: float = 10.0
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.integration:
            object.__setattr__(self, "integration", self.gateway)

    def redacted(self) -> dict[str, Any]:
        """The effective settings with the secret hidden, fit for a log or a status file."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = "***" if isinstance(v, Secret) else v
        return out


def _url(value: object, where: str) -> str:
    """A gateway URL that httpx can use and that is safe to show in a log or a status file."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a URL such as https://apim-ppe1.envisioniot.com")
    authority = re.split(r"[/?#]", value.partition("//")[2], maxsplit=1)[0]
    if "@" in authority:
        # Checked first, so that no message below echoes a password. Credentials here
        # would reach the log and /.enosfs/config.
        raise ConfigError(
            f"{where} must not hold credentials (user:password@): the app key and secret "
            "authenticate enosfs"
        )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        # urlsplit says "Invalid IPv6 URL" or "Port out of range 0-65535": say where.
        raise ConfigError(f"{where} is not a valid URL ({exc}): {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where} must be an http(s) URL, not {value!r}")
    if port == 0 or any(c.isspace() for c in value):
        raise ConfigError(f"{where} is not a valid URL: {value!r}")
    try:
        httpx.URL(value)  # what will use it: refuse here what it would refuse later
    except httpx.InvalidURL as exc:
        raise ConfigError(f"{where} is not a valid URL ({exc}): {value!r}") from None
    return value.rstrip("/")


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false")
    return value


def _table(value: object, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(value) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        hint = ", ".join(sorted(allowed))
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known here: {hint})")
    return value


def read_secret_file(path: str) -> str:
    """The secret in a file, refusing one that others can read, as ssh does for keys."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            # A FIFO or a device would block open() or read() and hang the mount.
            raise ConfigError(f"app secret file {p} is not a regular file")
        # O_NONBLOCK: should a FIFO have replaced the file since stat(), open returns.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"app secret file {p} is not a regular file")
            raw = os.read(fd, _SECRET_FILE_MAX + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(f"cannot read app secret file {p}: {exc.strerror}") from None
    if len(raw) > _SECRET_FILE_MAX:
        raise ConfigError(f"app secret file {p} is too large for a secret")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"app secret file {p} is not UTF-8 text") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"app secret file {p} is readable by other users; run: chmod 600 {p}")
    secret = text.strip()
    if not secret:
        raise ConfigError(f"app secret file {p} is empty")
    return secret


def load_settings(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Settings:
    """Read and check a configuration file; the secret comes from env or a file."""
    env = dict(os.environ) if env is None else env
    p = Path(path)
    name = str(p)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from None
    try:
        return settings_from_dict(raw, env, base_dir=p.parent, source=name)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _file_name(value: object, where: str) -> str:
    """A configured file's name is a folder entry as it stands: what no folder can hold
    is refused here, naming the key, instead of failing the whole folder later."""
    name = _str(value, where)
    if name in (".", ".."):
        raise ConfigError(f"{where} must not be '.' or '..'")
    if "/" in name:
        raise ConfigError(f"{where} {name!r} must not contain '/'")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise ConfigError(f"{where} {name!r} must not contain NUL or control characters")
    if len(name.encode("utf-8")) > NAME_MAX:
        raise ConfigError(f"{where} must be at most {NAME_MAX} bytes in UTF-8")
    shown = safe_name(name)
    if shown != name:
        raise ConfigError(f"{where} {name!r} is not a safe file name; use {shown!r}")
    return name


def settings_from_dict(
    raw: dict[str, Any],
    env: dict[str, str],
    *,
    base_dir: Path = Path("."),
    source: str = "",
) -> Settings:
    top = _table(raw, "", {"enos", "org", "file", "cache", "kernel", "network"})
    if "app_secret" in top.get("enos", {}):
        raise ConfigError(
            "enos.app_secret is not allowed: put the secret in a file named by "
            f"enos.app_secret_file, or in the {SECRET_ENV} environment variable"
        )
    enos = (
        _table(top.get("enos"), "enos", {"gateway", "integration", "app_key", "app_secret_file"})
        if "enos" in top
        else None
    )
    if enos is None:
        raise ConfigError("missing [enos] table with gateway and app_key")
    if "gateway" not in enos:
        raise ConfigError("missing enos.gateway")
    if "app_key" not in enos:
        raise ConfigError("missing enos.app_key")
    gateway = _url(enos["gateway"], "enos.gateway")
    integration = _url(enos["integration"], "enos.integration") if "integration" in enos else ""
    app_key = _str(enos["app_key"], "enos.app_key")

    if "app_secret_file" in enos:
        secret_path = Path(_str(enos["app_secret_file"], "enos.app_secret_file")).expanduser()
        if not secret_path.is_absolute():
            secret_path = base_dir / secret_path
        secret_file: str | None = os.path.abspath(secret_path)
        secret = read_secret_file(str(secret_file))
    elif env.get(SECRET_ENV):
        secret_file = None
        secret = env[SECRET_ENV]
    else:
        raise ConfigError(f"no app secret: set {SECRET_ENV} or name a file in enos.app_secret_file")

    orgs_raw = top.get("org", [])
    if not isinstance(orgs_raw, list) or not orgs_raw:
        raise ConfigError('name at least one organisation: [[org]] with id = "..."')
    orgs: list[OrgSettings] = []
    for i, o in enumerate(orgs_raw):
        where = f"org[{i}]"
        o = _table(o, where, {"id", "assets", "discover"})
        if "id" not in o:
            raise ConfigError(f"missing {where}.id")
        assets = o.get("assets", [])
        if not isinstance(assets, list) or not all(isinstance(a, str) and a for a in assets):
            raise ConfigError(f"{where}.assets must be a list of asset ids")
        org_id = _str(o["id"], f"{where}.id")
        if "/" in org_id or "\x00" in org_id or org_id in (".", ".."):
            raise ConfigError(f"{where}.id {org_id!r} is not an organisation id")
        orgs.append(
            OrgSettings(
                org_id=org_id,
                assets=tuple(assets),
                discover=_bool(o.get("discover", True), f"{where}.discover"),
            )
        )
    org_ids = [o.org_id for o in orgs]
    if len(set(org_ids)) != len(org_ids):
        raise ConfigError("an organisation is named twice in [[org]]")

    files: list[FileRef] = []
    files_raw = top.get("file", [])
    if not isinstance(files_raw, list):
        raise ConfigError("file must be an array of tables: [[file]]")
    for i, f in enumerate(files_raw):
        where = f"file[{i}]"
        f = _table(f, where, {"org", "asset", "category", "uri", "name"})
        for key in ("org", "asset", "uri"):
            if key not in f:
                raise ConfigError(f"missing {where}.{key}")
        category = f.get("category", "feature")
        if category not in CATEGORIES:
            raise ConfigError(f"{where}.category must be 'feature' or 'ota'")
        org = _str(f["org"], f"{where}.org")
        if org not in org_ids:
            raise ConfigError(f"{where}.org {org!r} is not one of the [[org]] ids")
        uri = _str(f["uri"], f"{where}.uri")
        if "://" not in uri:
            raise ConfigError(f"{where}.uri must look like enos-connect://<id>.<ext>")
        files.append(
            FileRef(
                org=org,
                asset=_str(f["asset"], f"{where}.asset"),
                category=category,
                uri=uri,
                name=_file_name(f["name"], f"{where}.name") if "name" in f else None,
            )
        )

    kw: dict[str, Any] = {}
    cache = _table(
        top.get("cache", {}),
        "cache",
        {"memory", "block_size", "metadata_ttl", "read_ahead", "dir", "disk_size", "min_free"},
    )
    if "dir" in cache:
        d = Path(_str(cache["dir"], "cache.dir")).expanduser()
        kw["cache_dir"] = str(d if d.is_absolute() else (base_dir / d).resolve())
    if "disk_size" in cache:
        kw["disk_size"] = parse_size(cache["disk_size"], "cache.disk_size")
    if "min_free" in cache:
        kw["min_free"] = parse_share(cache["min_free"], "cache.min_free")
    if "read_ahead" in cache:
        kw["read_ahead"] = parse_size(cache["read_ahead"], "cache.read_ahead")
    if "memory" in cache:
        kw["cache_memory"] = parse_size(cache["memory"], "cache.memory")
    if "block_size" in cache:
        kw["block_size"] = parse_size(cache["block_size"], "cache.block_size")
    if "metadata_ttl" in cache:
        kw["metadata_ttl"] = parse_seconds(cache["metadata_ttl"], "cache.metadata_ttl")

    kernel = _table(
        top.get("kernel", {}),
        "kernel",
        {"entry_timeout", "attr_timeout", "allow_other", "read_ahead", "direct_io"},
    )
    if "read_ahead" in kernel:
        kw["kernel_read_ahead"] = parse_size(kernel["read_ahead"], "kernel.read_ahead")
    for key in ("entry_timeout", "attr_timeout"):
        if key in kernel:
            kw[key] = parse_seconds(kernel[key], f"kernel.{key}")
    if "allow_other" in kernel:
        kw["allow_other"] = _bool(kernel["allow_other"], "kernel.allow_other")
    if "direct_io" in kernel:
        kw["direct_io"] = _bool(kernel["direct_io"], "kernel.direct_io")

    network = _table(
        top.get("network", {}),
        "network",
        {
            "timeout",
            "connect_timeout",
            "ca_bundle",
            "max_connections",
            "retries",
            "token_refresh_margin",
            "min_speed",
            "speed_time",
        },
    )
    if "min_speed" in network:
        kw["min_speed"] = parse_size(network["min_speed"], "network.min_speed")
    for key in ("timeout", "connect_timeout", "token_refresh_margin", "speed_time"):
        if key in network:
            kw[key] = parse_seconds(network[key], f"network.{key}")
    if kw.get("timeout") == 0 or kw.get("connect_timeout") == 0:
        raise ConfigError("network timeouts must be above zero")
    if "ca_bundle" in network:
        ca = Path(_str(network["ca_bundle"], "network.ca_bundle")).expanduser()
        if not ca.is_absolute():
            ca = base_dir / ca
        if not ca.is_file():
            raise ConfigError(f"network.ca_bundle {ca} is not a file")
        kw["ca_bundle"] = str(ca)
    if "retries" in network:
        r = network["retries"]
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= 100:
            raise ConfigError("network.retries must be an integer from 0 to 100")
        kw["retries"] = r
    if "max_connections" in network:
        mc = network["max_connections"]
        if not isinstance(mc, int) or isinstance(mc, bool) or not 1 <= mc <= 1024:
            raise ConfigError("network.max_connections must be an integer from 1 to 1024")
        kw["max_connections"] = mc

    settings = Settings(
        gateway=gateway,
        integration=integration,
        app_key=app_key,
        app_secret=Secret(secret),
        app_secret_file=secret_file,
        orgs=tuple(orgs),
        files=tuple(files),
        source=source,
        **kw,
    )
    return validated(settings, read_ahead_given="read_ahead" in cache)


def validated(settings: Settings, *, read_ahead_given: bool = True) -> Settings:
    """Checks across settings, wherever they came from (file, flags, -o options)."""
    bs = settings.block_size
    if bs < 4096 or bs > 64 * 1024**2 or bs & (bs - 1):
        raise ConfigError("cache.block_size must be a power of two from 4KiB to 64MiB")
    if settings.cache_memory < 4 * settings.block_size:
        raise ConfigError("cache.memory must hold at least four blocks")
    if settings.timeout <= 0 or settings.connect_timeout <= 0:
        raise ConfigError("network timeouts must be above zero")
    if settings.cache_dir is not None and settings.disk_size < 4 * settings.block_size:
        raise ConfigError("the disk cache must hold at least four blocks (cache.disk_size)")
    if not read_ahead_given:
        # The default follows the budget, so a small cache.memory alone is valid.
        settings = replace(
            settings, read_ahead=min(settings.read_ahead, settings.cache_memory // 4)
        )
    elif settings.read_ahead > settings.cache_memory // 2:
        raise ConfigError("cache.read_ahead must be at most half of cache.memory")
    return settings
