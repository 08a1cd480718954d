"""How EnOS metadata becomes file and folder names.

Names must be stable across remounts, so they are derived only from facts every server
gives (feature identifier, fileUri, firmware name and version), never from metadata an
older server may lack (original file names live in xattrs instead). They must be safe:
no '/', no NUL, not '.' or '..', at most 255 bytes, and unique within their folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence

NAME_MAX = 255
# Separators and control characters (C0 and C1: a terminal obeys some of them), and
# what makes `ls` output lie: bidirectional overrides and isolates, which reorder how a
# name is shown, and characters drawn like a slash, which fake a path inside one name.
_UNSAFE = re.compile(
    r"[\x00-\x1f\x7f-\x9f/\\"
    r"\u200e\u200f\u202a-\u202e\u2066-\u2069"
    r"\u2044\u2215\u29f8\uff0f]"
)
_EXT = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9_-]{0,15}$")


def uri_id(uri: str) -> str:
    """The part of a fileUri after its scheme: 'enos-connect://ab12.txt' -> 'ab12.txt'."""
    tail = uri.split("://", 1)[-1]
    return tail.rsplit("/", 1)[-1]


def uri_extension(uri: str) -> str:
    """The original extension a fileUri carries ('.txt'), or '' when it has none."""
    m = _EXT.search(uri_id(uri))
    return m.group(0).lower() if m else ""


def _fit(name: str) -> str:
    """Shorten to NAME_MAX bytes, keeping the extension and adding a hash for uniqueness."""
    raw = name.encode("utf-8")
    if len(raw) <= NAME_MAX:
        return name
    m = _EXT.search(name)
    ext = m.group(0) if m else ""
    digest = hashlib.sha256(raw).hexdigest()[:12]
    budget = NAME_MAX - len(ext.encode()) - len(digest) - 1
    stem = raw[:budget].decode("utf-8", "ignore")
    return f"{stem}~{digest}{ext}"


def safe_name(raw: str, fallback: str = "unnamed") -> str:
    """A name that can sit in a folder: no separators, control bytes or dot-names."""
    text = raw.encode("utf-8", "replace").decode("utf-8")
    text = _UNSAFE.sub("_", text).strip()
    if not text:
        text = fallback
    if text in (".", ".."):
        text = text.replace(".", "_")
    return _fit(text)


def feature_file_name(identifier: str, uri: str) -> str:
    """'manual' holding enos-connect://ab12.pdf -> 'manual.pdf'."""
    return safe_name(identifier + uri_extension(uri), fallback="feature" + uri_extension(uri))


def firmware_file_name(name: str, version: str, url: str) -> str:
    """Firmware 'Controller FW' 1.2.0 at enos-connect://ab12.bin -> 'Controller FW-1.2.0.bin'."""
    base = f"{name}-{version}" if version else name
    ext = uri_extension(url)
    if ext and base.lower().endswith(ext):
        ext = ""
    return safe_name(base + ext, fallback="firmware" + ext)


def _with_suffix(name: str, n: int, extension: bool = True) -> str:
    m = _EXT.search(name) if extension else None
    if m and m.start() > 0:
        return _fit(f"{name[: m.start()]}~{n}{m.group(0)}")
    return _fit(f"{name}~{n}")


def settle(
    candidates: Iterable[tuple[str, Sequence[str]]], *, extensions: bool = True
) -> list[str]:
    """Unique names for (wanted name, tie-break key) pairs, in the order given.

    The entry with the smallest key keeps the wanted name; the others get '~2', '~3', ...
    before the extension (at the end when `extensions` is false: a folder such as
    'WT.001' has none), in key order. The result depends only on the input set, so the
    same server data always yields the same names.
    """
    items = list(candidates)
    order = sorted(range(len(items)), key=lambda i: (items[i][0], tuple(items[i][1])))
    taken: set[str] = set()
    out: list[str] = [""] * len(items)
    wanted = {name for name, _ in items}
    # The next suffix to try per name: a thousand devices called "Inverter" must not
    # try 2, 3, ... again for each (taken and wanted only grow, so none frees up).
    next_suffix: dict[str, int] = {}
    for i in order:
        name = items[i][0]
        if name in taken:
            n = next_suffix.get(name, 2)
            while True:
                candidate = _with_suffix(name, n, extensions)
                if candidate not in taken and candidate not in wanted:
                    break
                n += 1
            next_suffix[name] = n + 1
            name = candidate
        taken.add(name)
        out[i] = name
    return out
