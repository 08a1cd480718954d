"""The mount's counters for Prometheus (`--metrics-addr`), built from the same snapshot
as /.enosfs/stats. prometheus-client serves them from its own thread; the snapshot is
taken on the trio thread, where the counters live, so it never sees them half-changed.

Every metric is declared once, in METRICS: its name, its help, and where its value
sits in the stats document. Exporting a new counter is one line there; nothing else
names it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from enosfs.errors import ConfigError

EACH = "*"  # in a Metric's path: every key at that level, exported as its label


@dataclass(frozen=True)
class Metric:
    """One exported metric and the place in the stats document it is read from.

    A path with EACH in it gives one sample per key found there (the key is the
    label's value); without, one sample, 0 where the document has none yet, unless
    the metric is optional (then it is left out, as a token not yet fetched is)."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    path: tuple[str, ...]
    label: str | None = None
    optional: bool = False


METRICS: tuple[Metric, ...] = (
    Metric("enosfs_requests", "counter", "EnOS API requests by kind", ("requests", EACH), "kind"),
    Metric("enosfs_retries", "counter", "Requests retried", ("retries",)),
    Metric(
        "enosfs_api_concurrency_limit",
        "gauge",
        "API calls allowed in flight now (adapts to the gateway's 429s)",
        ("throttle", "limit"),
        optional=True,
    ),
    Metric(
        "enosfs_rate_limited",
        "counter",
        "Rate-limit answers from the gateway (HTTP 429, envelopes)",
        ("throttle", "rate_limited"),
    ),
    Metric(
        "enosfs_throttled_waits",
        "counter",
        "API calls that waited for a slot or a Retry-After",
        ("throttle", "throttled_waits"),
    ),
    Metric("enosfs_downloaded_bytes", "counter", "File bytes downloaded", ("bytes_downloaded",)),
    Metric("enosfs_cache_hits", "counter", "Block cache hits", ("cache", EACH, "hits"), "tier"),
    Metric(
        "enosfs_cache_misses", "counter", "Block cache misses", ("cache", EACH, "misses"), "tier"
    ),
    Metric("enosfs_cache_bytes", "gauge", "Bytes held", ("cache", EACH, "bytes"), "tier"),
    Metric(
        "enosfs_inflight_bytes", "gauge", "Bytes of blocks being fetched", ("in_flight", "bytes")
    ),
    Metric("enosfs_errors", "counter", "Errors answered to the kernel", ("errors", EACH), "errno"),
    Metric("enosfs_kernel_reads", "counter", "Read requests from the kernel", ("kernel", "reads")),
    Metric("enosfs_open_files", "gauge", "Files open through the mount", ("kernel", "open_files")),
    Metric(
        "enosfs_token_expires_in_seconds",
        "gauge",
        "Seconds until the access token expires",
        ("token", "expires_in_s"),
        optional=True,
    ),
)


def samples(metric: Metric, doc: Mapping[str, Any]) -> list[tuple[tuple[str, ...], float]]:
    """The metric's values in a stats document, each with its label values."""
    found: list[tuple[tuple[str, ...], Any]] = [((), doc)]
    for step in metric.path:
        deeper: list[tuple[tuple[str, ...], Any]] = []
        for labels, node in found:
            if not isinstance(node, Mapping):
                continue  # a plain number beside the tiers (cache.verified_files)
            if step == EACH:
                deeper.extend(((*labels, key), value) for key, value in node.items())
            elif step in node:
                deeper.append((labels, node[step]))
        found = deeper
    return [(labels, value) for labels, value in found if value is not None]


def families(doc: Mapping[str, Any]) -> Iterator[Any]:
    """The metric families prometheus-client exports for one stats document."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for metric in METRICS:
        family = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
        found = samples(metric, doc)
        if metric.label is None:
            if not found and metric.optional:
                continue
            yield family(metric.name, metric.help, value=found[0][1] if found else 0)
        else:
            labelled = family(metric.name, metric.help, labels=[metric.label])
            for labels, value in found:
                labelled.add_metric(list(labels), value)
            yield labelled


def serve(addr: tuple[str, int], snapshot: Callable[[], dict[str, Any]]) -> None:
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ConfigError(
            "--metrics-addr needs prometheus-client: pip install 'enos-fuse[metrics]'"
        ) from None

    class Collector:
        def collect(self) -> Iterator[Any]:
            return families(snapshot())

    registry = CollectorRegistry()
    registry.register(Collector())
    try:
        start_http_server(addr[1], addr=addr[0], registry=registry)
    except OSError as exc:
        raise ConfigError(f"--metrics-addr {addr[0]}:{addr[1]}: {exc.strerror}") from None
