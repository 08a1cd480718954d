"""`enosfs stats`: the mount's state from /.enosfs/stats, once or as a live view."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from enosfs.errors import EnosfsError
from enosfs.namespace import CONTROL_DIR
from enosfs.verify import human


def read_stats(mountpoint: str) -> dict[str, Any]:
    path = Path(mountpoint) / CONTROL_DIR / "stats"
    try:
        return dict(json.loads(path.read_bytes()))
    except FileNotFoundError:
        raise EnosfsError(f"{mountpoint} is not an enosfs mount (no {CONTROL_DIR}/stats)") from None
    except OSError as exc:
        raise EnosfsError(f"{mountpoint}: cannot read its stats: {exc.strerror}") from None
    except ValueError:
        raise EnosfsError(f"{mountpoint}: its stats are not JSON") from None


def _ratio(hits: int, misses: int) -> str:
    return f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-"


def describe(doc: dict[str, Any], prev: dict[str, Any] | None = None) -> list[str]:
    """Lines for a person: totals, and rates since prev when there is one."""
    dt = (doc["time"] - prev["time"]) if prev else 0.0

    def rate(get: Any) -> str:
        if not prev or dt <= 0:
            return ""
        return f" ({human(max(0, get(doc) - get(prev)) / dt)}/s)"

    requests = sum(doc.get("requests", {}).values())
    cache = doc.get("cache", {})
    mem = cache.get("memory", {})
    lines = [
        f"enosfs {doc['version']} at {doc['mountpoint']}, up {doc['uptime_s']:.0f}s",
        f"requests      {requests} ({doc.get('retries', 0)} retried)"
        + (
            f", {(requests - sum(prev.get('requests', {}).values())) / dt:.1f}/s"
            if prev and dt > 0
            else ""
        ),
        f"downloaded    {human(doc.get('bytes_downloaded', 0))}"
        + rate(lambda d: d.get("bytes_downloaded", 0)),
        f"kernel reads  {doc.get('kernel', {}).get('reads', 0)}, "
        f"{human(doc.get('kernel', {}).get('read_bytes', 0))}"
        + rate(lambda d: d.get("kernel", {}).get("read_bytes", 0)),
        f"memory cache  {human(mem.get('bytes', 0))} of {human(mem.get('capacity', 0))}, "
        f"hit ratio {_ratio(mem.get('hits', 0), mem.get('misses', 0))}",
    ]
    if "disk" in cache:
        disk = cache["disk"]
        lines.append(
            f"disk cache    {human(disk['bytes'])} of {human(disk['capacity'])}, "
            f"hit ratio {_ratio(disk['hits'], disk['misses'])}"
        )
    flight = doc.get("in_flight", {})
    lines.append(
        f"in flight     {flight.get('blocks', 0)} blocks, "
        f"{human(flight.get('bytes', 0))}, "
        f"{flight.get('connections', 0)} connections"
    )
    errors = doc.get("errors", {})
    lines.append("errors        " + (", ".join(f"{k} {v}" for k, v in errors.items()) or "none"))
    token = doc.get("token", {})
    if token.get("expires_in_s") is not None:
        lines.append(
            f"token         expires in {token['expires_in_s']:.0f}s "
            f"({token.get('renewals', 0)} renewals)"
        )
    return lines


def watch(
    mountpoint: str,
    *,
    interval: float,
    count: int | None,
    raw: bool,
    live: bool,
    out: TextIO = sys.stdout,
) -> int:
    prev = None
    n = 0
    while True:
        doc = read_stats(mountpoint)
        if raw:
            print(json.dumps(doc), file=out, flush=True)
        elif live and out.isatty():
            out.write("\x1b[H\x1b[2J" + "\n".join(describe(doc, prev)) + "\n")
            out.flush()
        elif live:
            print(" | ".join(describe(doc, prev)[1:4]), file=out, flush=True)
        else:
            print("\n".join(describe(doc)), file=out)
        n += 1
        if not live or (count is not None and n >= count):
            return 0
        prev = doc
        time.sleep(interval)
