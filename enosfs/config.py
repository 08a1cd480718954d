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
from enosfs.settings_schema import SECTIONS, default, parse_sections
from enosfs.values import check_table, parse_bool, parse_text

# Where callers found them before values.py held them.
from enosfs.values import parse_seconds as parse_seconds
from enosfs.values import parse_share as parse_share
from enosfs.values import parse_size as parse_size

SECRET_ENV = "ENOSFS_APP_SECRET"
_SECRET_FILE_MAX = 64 * 1024
CATEGORIES = ("feature", "ota")


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


@dataclass(frozen=True)
class ConfiguredFile:
    """A file named in the configuration: shown even where no listing API finds it.
    (Not api.FileRef, which is how the client addresses any file.) Its device is
    named by asset id, or (asset "") by product and device key."""

    org: str
    asset: str
    category: str
    uri: str
    name: str | None = None
    product_key: str = ""
    device_key: str = ""


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
    files: tuple[ConfiguredFile, ...] = ()
    # Where the secret came from, so a rotated secret can be read again; None: from
    # the environment.
    app_secret_file: str | None = None
    # [cache], [kernel], [network]: defaults and meaning in settings_schema.SCHEMA
    cache_memory: int = default("cache_memory")
    block_size: int = default("block_size")
    metadata_ttl: float = default("metadata_ttl")
    negative_ttl: float = default("negative_ttl")
    read_ahead: int = default("read_ahead")
    first_bytes: int = default("first_bytes")  # 0: no first bytes at lookup (firstbytes.py)
    cache_dir: str | None = default("cache_dir")  # None: no disk cache
    disk_size: int = default("disk_size")
    min_free: float = default("min_free")
    entry_timeout: float = default("entry_timeout")
    attr_timeout: float = default("attr_timeout")
    allow_other: bool = default("allow_other")
    kernel_read_ahead: int = default("kernel_read_ahead")  # 0: leave the kernel's default
    direct_io: bool = default("direct_io")
    timeout: float = default("timeout")
    connect_timeout: float = default("connect_timeout")
    ca_bundle: str | None = default("ca_bundle")
    max_connections: int = default("max_connections")
    # The ceiling of the adaptive bound on API calls in flight (throttle.py).
    max_api_concurrency: int = default("max_api_concurrency")
    retries: int = default("retries")
    token_refresh_margin: float = default("token_refresh_margin")
    # A body slower than min_speed bytes/s for speed_time seconds is dropped and resumed
    # on a new connection (curl's --speed-limit/--speed-time); 0 turns this off.
    min_speed: int = default("min_speed")
    speed_time: float = default("speed_time")
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
    name = parse_text(value, where)
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
    top = check_table(raw, "", {"enos", "org", "file", *SECTIONS})
    if "app_secret" in top.get("enos", {}):
        raise ConfigError(
            "enos.app_secret is not allowed: put the secret in a file named by "
            f"enos.app_secret_file, or in the {SECRET_ENV} environment variable"
        )
    enos = (
        check_table(
            top.get("enos"), "enos", {"gateway", "integration", "app_key", "app_secret_file"}
        )
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
    app_key = parse_text(enos["app_key"], "enos.app_key")

    if "app_secret_file" in enos:
        secret_path = Path(parse_text(enos["app_secret_file"], "enos.app_secret_file")).expanduser()
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
        o = check_table(o, where, {"id", "assets", "discover"})
        if "id" not in o:
            raise ConfigError(f"missing {where}.id")
        assets = o.get("assets", [])
        if not isinstance(assets, list) or not all(isinstance(a, str) and a for a in assets):
            raise ConfigError(f"{where}.assets must be a list of asset ids")
        org_id = parse_text(o["id"], f"{where}.id")
        if "/" in org_id or "\x00" in org_id or org_id in (".", ".."):
            raise ConfigError(f"{where}.id {org_id!r} is not an organisation id")
        orgs.append(
            OrgSettings(
                org_id=org_id,
                assets=tuple(assets),
                discover=parse_bool(o.get("discover", True), f"{where}.discover"),
            )
        )
    org_ids = [o.org_id for o in orgs]
    if len(set(org_ids)) != len(org_ids):
        raise ConfigError("an organisation is named twice in [[org]]")

    files: list[ConfiguredFile] = []
    files_raw = top.get("file", [])
    if not isinstance(files_raw, list):
        raise ConfigError("file must be an array of tables: [[file]]")
    for i, f in enumerate(files_raw):
        where = f"file[{i}]"
        f = check_table(
            f, where, {"org", "asset", "product_key", "device_key", "category", "uri", "name"}
        )
        for key in ("org", "uri"):
            if key not in f:
                raise ConfigError(f"missing {where}.{key}")
        keyed = "product_key" in f or "device_key" in f
        if keyed == ("asset" in f) or (keyed and not {"product_key", "device_key"} <= f.keys()):
            raise ConfigError(
                f"{where} must name its device by asset, or by product_key and device_key"
            )
        category = f.get("category", "feature")
        if category not in CATEGORIES:
            raise ConfigError(f"{where}.category must be 'feature' or 'ota'")
        org = parse_text(f["org"], f"{where}.org")
        if org not in org_ids:
            raise ConfigError(f"{where}.org {org!r} is not one of the [[org]] ids")
        uri = parse_text(f["uri"], f"{where}.uri")
        if "://" not in uri:
            raise ConfigError(f"{where}.uri must look like enos-connect://<id>.<ext>")
        files.append(
            ConfiguredFile(
                org=org,
                asset=parse_text(f["asset"], f"{where}.asset") if "asset" in f else "",
                category=category,
                uri=uri,
                name=_file_name(f["name"], f"{where}.name") if "name" in f else None,
                product_key=parse_text(f["product_key"], f"{where}.product_key") if keyed else "",
                device_key=parse_text(f["device_key"], f"{where}.device_key") if keyed else "",
            )
        )

    kw = parse_sections(top, base_dir)

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
    return validated(settings, read_ahead_given="read_ahead" in kw)


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
