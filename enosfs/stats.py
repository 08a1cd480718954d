"""What the mount is doing, as one JSON document: /.enosfs/stats, `enosfs stats`, and
the Prometheus metrics all read this, so they never disagree."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from enosfs import __version__

if TYPE_CHECKING:
    from enosfs.api import EnosClient
    from enosfs.auth import TokenSource
    from enosfs.blocks import BlockCache
    from enosfs.config import Settings
    from enosfs.diskcache import DiskCache
    from enosfs.fs import EnosFS
    from enosfs.transport import LeanTransport


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
    read_ahead_kb: int | None = None  # the kernel's, read back once the mount is up


def snapshot(p: Parts) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": __version__,
        "mountpoint": p.mountpoint,
        "uptime_s": round(time.time() - p.started, 3),
        "time": time.time(),
    }
    if p.client is not None:
        doc["requests"] = dict(sorted(p.client.requests.items()))
        doc["retries"] = p.client.retries
    cache = p.cache
    if cache is not None:
        s = cache.stats
        doc["bytes_downloaded"] = s["bytes"]
        doc["cache"] = {
            "memory": {
                "hits": s["hits"],
                "misses": s["waits"],
                "bytes": cache.lru.currsize,
                "capacity": cache.lru.maxsize,
                "blocks": len(cache.lru),
            },
            "verified_files": s["verified_files"],
            "integrity_failures": s["integrity_failures"],
            "bad_blocks": s["bad_blocks"],
            "files_changed": s["changed"],
            "resumes": s["resumes"],
            "read_ahead_clipped": s["readahead_clipped"],
            "split_fetches": s["split_fetches"],
            "failed_fast": s["failed_fast"],
            "reader_timeouts": s["reader_timeouts"],
            "slow_bodies": s["slow_bodies"],
            "reused_buffers": s["reused_buffers"],
        }
        doc["in_flight"] = {"blocks": len(cache.flights), "bytes": cache.inflight}
    if p.disk is not None:
        doc.setdefault("cache", {})["disk"] = p.disk.summary()
    if p.lean is not None:
        doc.setdefault("in_flight", {})["connections"] = p.lean.in_use
        doc["connections_opened"] = p.lean.connects
    if p.fs is not None:
        doc["kernel"] = {
            "reads": p.fs.stats["reads"],
            "read_bytes": p.fs.stats["read_bytes"],
            "open_files": len(p.fs.handles),
            "read_ahead_kb": p.read_ahead_kb,
        }
        doc["whole_readings"] = {
            "checked": p.fs.stats["readings_checked"],
            "broken": p.fs.stats["readings_broken"],
        }
        doc["errors"] = dict(sorted(p.fs.errors.items()))
    if p.tokens is not None:
        left = p.tokens.expires_in
        doc["token"] = {
            "expires_in_s": None if left is None else round(left, 1),
            "expires_at": None if left is None else round(time.time() + left, 1),
            "renewals": p.tokens.refreshes,
        }
    return doc


def render_stats(p: Parts) -> bytes:
    return (json.dumps(snapshot(p), indent=2) + "\n").encode()


def render_config(settings: Settings) -> bytes:
    return (json.dumps(settings.redacted(), indent=2, default=str) + "\n").encode()


def render_version() -> bytes:
    return f"enosfs {__version__}\n".encode()
