"""The mount's counters for Prometheus (`--metrics-addr`), built from the same snapshot
as /.enosfs/stats. prometheus-client serves them from its own thread; the snapshot is
taken on the trio thread, where the counters live, so it never sees them half-changed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from enosfs.errors import ConfigError


def serve(addr: tuple[str, int], snapshot: Callable[[], dict[str, Any]]) -> None:
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    except ImportError:
        raise ConfigError(
            "--metrics-addr needs prometheus-client: pip install 'enos-fuse[metrics]'"
        ) from None

    class Collector:
        def collect(self) -> Iterator[Any]:
            doc = snapshot()
            requests = CounterMetricFamily(
                "enosfs_requests", "EnOS API requests by kind", labels=["kind"]
            )
            for kind, n in doc.get("requests", {}).items():
                requests.add_metric([kind], n)
            yield requests
            yield CounterMetricFamily(
                "enosfs_retries", "Requests retried", value=doc.get("retries", 0)
            )
            yield CounterMetricFamily(
                "enosfs_downloaded_bytes",
                "File bytes downloaded",
                value=doc.get("bytes_downloaded", 0),
            )
            cache = doc.get("cache", {})
            hits = CounterMetricFamily("enosfs_cache_hits", "Block cache hits", labels=["tier"])
            misses = CounterMetricFamily(
                "enosfs_cache_misses", "Block cache misses", labels=["tier"]
            )
            held = GaugeMetricFamily("enosfs_cache_bytes", "Bytes held", labels=["tier"])
            for tier in ("memory", "disk"):
                if tier in cache:
                    hits.add_metric([tier], cache[tier]["hits"])
                    misses.add_metric([tier], cache[tier]["misses"])
                    held.add_metric([tier], cache[tier]["bytes"])
            yield hits
            yield misses
            yield held
            flight = doc.get("in_flight", {})
            yield GaugeMetricFamily(
                "enosfs_inflight_bytes",
                "Bytes of blocks being fetched",
                value=flight.get("bytes", 0),
            )
            errors = CounterMetricFamily(
                "enosfs_errors", "Errors answered to the kernel", labels=["errno"]
            )
            for name, n in doc.get("errors", {}).items():
                errors.add_metric([name], n)
            yield errors
            kernel = doc.get("kernel", {})
            yield CounterMetricFamily(
                "enosfs_kernel_reads", "Read requests from the kernel", value=kernel.get("reads", 0)
            )
            yield GaugeMetricFamily(
                "enosfs_open_files",
                "Files open through the mount",
                value=kernel.get("open_files", 0),
            )
            left = doc.get("token", {}).get("expires_in_s")
            if left is not None:
                yield GaugeMetricFamily(
                    "enosfs_token_expires_in_seconds",
                    "Seconds until the access token expires",
                    value=left,
                )

    registry = CollectorRegistry()
    registry.register(Collector())
    try:
        start_http_server(addr[1], addr=addr[0], registry=registry)
    except OSError as exc:
        raise ConfigError(f"--metrics-addr {addr[0]}:{addr[1]}: {exc.strerror}") from None
