"""What the mount is doing, as one JSON document: /.enosfs/stats, `enosfs stats`, and
the Prometheus metrics all read this, so they never disagree."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from enosfs import __version__

if TYPE_CHECKING:
    from enosfs.api import EnosClient
    from enosfs.auth import TokenSource
    from enosfs.blocks import BlockCache
    from enosfs.changes import Changes
    from enosfs.config import Settings
    from enosfs.diskcache import DiskCache
    from enosfs.fs import EnosFS
    from enosfs.metastore import MetaStore
    from enosfs.transport import LeanTransport


class Reports(Protocol):
    """A component with a part of the document to tell."""

    def stats(self) -> dict[str, Any]: ...


@dataclass
class Parts:
    """The pieces of a running mount that have something to tell."""

    settings: Settings
    mountpoint: str
    started: float = field(default_factory=time.time)
    client: EnosClient | None = None
    tokens: TokenSource | None = None
    cache: BlockCache | None = None
    disk: DiskCache | None = None
    fs: EnosFS | None = None
    lean: LeanTransport | None = None
    store: MetaStore | None = None
    changes: Changes | None = None
    read_ahead_kb: int | None = None  # the kernel's, read back once the mount is up


def snapshot(p: Parts) -> dict[str, Any]:
    """The document: the mount's own lines, then each component's part, merged."""
    doc: dict[str, Any] = {
        "version": __version__,
        "mountpoint": p.mountpoint,
        "uptime_s": round(time.time() - p.started, 3),
        "time": time.time(),
    }
    parts: tuple[Reports | None, ...] = (
        p.client,
        p.cache,
        p.disk,
        p.lean,
        p.fs,
        p.tokens,
        p.store,
        p.changes,
    )
    for part in parts:
        if part is not None:
            _merge(doc, part.stats())
    if p.fs is not None:
        doc["kernel"]["read_ahead_kb"] = p.read_ahead_kb
    return doc


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Put a component's part in the document; sections two components share (cache,
    in_flight) get the keys of both."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def render_stats(p: Parts) -> bytes:
    return (json.dumps(snapshot(p), indent=2) + "\n").encode()


def render_config(settings: Settings) -> bytes:
    return (json.dumps(settings.redacted(), indent=2, default=str) + "\n").encode()


def render_version() -> bytes:
    return f"enosfs {__version__}\n".encode()
