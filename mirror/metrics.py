"""Prometheus collectors, registered on a registry the application owns (never at import time)."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from mirror import __version__


class MaintenanceCollector(Collector):
    """`mirror verify` and `mirror gc` run as other processes; they leave cumulative counts in the data
    directory, and every scrape reads them from there."""

    _FAMILIES = {
        "verify_runs": ("mirror_verify_runs", "Completed `mirror verify` runs."),
        "quarantined": ("mirror_quarantined_blobs", "Blobs quarantined because their bytes no longer matched."),
        "gc_runs": ("mirror_gc_runs", "Completed `mirror gc` runs (not dry runs)."),
        "gc_bytes_freed": ("mirror_gc_freed_bytes", "Bytes removed by `mirror gc`."),
    }

    def __init__(self, read_stats: Callable[[], dict[str, int]]) -> None:
        self.read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.read_stats()
        for key, (name, documentation) in self._FAMILIES.items():
            family = CounterMetricFamily(name, documentation)
            family.add_metric([], stats.get(key, 0))
            yield family


class FilesystemCollector(Collector):
    """Free and total bytes of the filesystem holding the data directory, read at every scrape: a disk
    filled by something else is what the cache bound cannot see."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterator[Metric]:
        try:
            stats = os.statvfs(self.path)
        except OSError:
            return
        free = GaugeMetricFamily("mirror_storage_free_bytes", "Bytes free for the mirror on its data filesystem.")
        free.add_metric([], stats.f_bavail * stats.f_frsize)
        total = GaugeMetricFamily("mirror_storage_size_bytes", "Size of the data filesystem in bytes.")
        total.add_metric([], stats.f_blocks * stats.f_frsize)
        yield free
        yield total


class Metrics:
    def __init__(self, *, created_series: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # `_created` samples double the series count and no dashboard uses them; off unless asked for.
        self.created_series = created_series
        r = self.registry
        self.build_info = Gauge(
            "mirror_build_info", "Always 1; the labels say which version and Python serve.",
            ["version", "python"], registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.http_requests = Counter(
            "mirror_http_requests", "Requests served, by endpoint, method and status (499: the client's "
            "connection closed before its response was complete).",
            ["endpoint", "method", "status"], registry=r,
        )
        self.http_malformed = Counter(
            "mirror_http_malformed_requests", "Requests HTTP itself could not parse (answered 400 by aiohttp; "
            "logged as one rate-limited WARNING line each).", registry=r,
        )
        self.http_seconds = Histogram(
            "mirror_http_request_duration_seconds", "Time to the end of the handler (streamed bodies excluded).",
            ["endpoint", "method"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.cache_lookups = Counter(
            "mirror_cache_lookups", "Pull-through lookups by upstream, kind (blob/manifest/tag) and result "
            "(hit, miss, stale, revalidated; for tags also shared: resolved by another cluster node; "
            "for blobs also joined: a download under way, prefetched: a prefetch under way).",
            ["upstream", "kind", "result"], registry=r,
        )
        self.upstream_requests = Counter(
            "mirror_upstream_requests", "Requests sent to upstream registries, by method, kind (manifest, blob, "
            "tags, referrers, base, token) and status. Docker Hub counts GETs of kind manifest as pulls.",
            ["upstream", "method", "kind", "status"], registry=r,
        )
        self.pulls = Counter(
            "mirror_pulls", "Pulls answered to clients, counted as Docker Hub counts them (manifest GETs answered "
            "200), by upstream (`local` for pushed repositories).",
            ["upstream"], registry=r,
        )
        self.served_bytes = Counter(
            "mirror_served_bytes", "Blob bytes sent to clients, by where they came from: cache (stored before the "
            "request), upstream (streamed from a download the request started or joined), local (pushed).",
            ["source"], registry=r,
        )
        self.upstream_bytes = Counter(
            "mirror_upstream_bytes", "Blob bytes downloaded from upstreams.", ["upstream"], registry=r,
        )
        self.cluster_peer_bytes = Counter(
            "mirror_cluster_peer_bytes", "Blob bytes of an upstream's fills streamed from another cluster node "
            "(the one downloading it) instead of from the upstream.", ["upstream"], registry=r,
        )
        self.shared_cache_bytes = Counter(
            "mirror_shared_cache_bytes", "Blob bytes of an upstream's fills read from the shared bucket (another "
            "node filled them before) instead of from the upstream.", ["upstream"], registry=r,
        )
        self.shared_cache_manifests = Counter(
            "mirror_shared_cache_manifests", "Manifests of an upstream read from the shared bucket instead of "
            "from the upstream.", ["upstream"], registry=r,
        )
        self.shared_cache_evictions = Counter(
            "mirror_shared_cache_evictions", "Objects deleted from the shared tier in the bucket to keep it "
            "within storage.s3.cache_max_size (cluster-wide).", registry=r,
        )
        self.upstream_errors = Counter(
            "mirror_upstream_errors", "Upstream failures (connection, timeout, 5xx, 429, verification).",
            ["upstream", "reason"], registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "mirror_upstream_ratelimit_remaining", "Last ratelimit-remaining an upstream reported.",
            ["upstream"], registry=r,
        )
        self.ratelimit_limit = Gauge(
            "mirror_upstream_ratelimit_limit", "Last ratelimit-limit an upstream reported.", ["upstream"], registry=r,
        )
        self.fills_in_progress = Gauge(
            "mirror_fills_in_progress", "Upstream blob downloads running now.", registry=r,
        )
        self.fill_waiters = Counter(
            "mirror_fill_joins", "Requests that joined a download already running instead of starting one.",
            registry=r,
        )
        self.uploads_open_bytes = Gauge(
            "mirror_uploads_open_bytes", "Bytes held by upload sessions not finished yet (bounded by "
            "uploads.max_bytes).", registry=r,
        )
        self.uploads_expired = Counter(
            "mirror_uploads_expired", "Upload sessions removed after uploads.expire without activity.", registry=r,
        )
        self.fills = Counter(
            "mirror_fills", "Finished upstream blob downloads by result (ok, failed, invalid).",
            ["upstream", "result"], registry=r,
        )
        self.prefetch_fills = Counter(
            "mirror_prefetch_fills", "Layer prefetches by result (ok, failed, cached: already here, running: a "
            "fill was under way, no_room: skipped for the cache bound or disk space, cancelled: given up for a "
            "client's fill).",
            ["upstream", "result"], registry=r,
        )
        self.prefetch_claims = Counter(
            "mirror_prefetch_claims", "Client blob requests that joined a prefetch already running.",
            ["upstream"], registry=r,
        )

        self.stored_bytes = Gauge(
            "mirror_stored_bytes", "Bytes on disk by holder (cached: evictable upstream content; local: pushed; "
            "pinned: kept by replication).",
            ["holder"], registry=r,
        )
        self.cache_max_bytes = Gauge(
            "mirror_cache_max_bytes", "storage.max_size: the bound on cached upstream content (absent when unbounded).",
            registry=r,
        )
        self.upstream_up = Gauge(
            "mirror_upstream_up", "1 when the upstream's last request got an HTTP answer below 500, 0 when it "
            "failed (refused, timed out, 5xx after retries).",
            ["upstream"], registry=r,
        )
        self.evictions = Counter("mirror_evictions", "Blobs evicted from the cache.", registry=r)
        self.evicted_bytes = Counter("mirror_evicted_bytes", "Bytes evicted from the cache.", registry=r)
        self.index_reconciled = Gauge(
            "mirror_index_reconciled", "1 once the start-up check of the blob index against the files is done "
            "(it runs while requests are served; nothing is evicted before).", registry=r,
        )
        self.index_reconcile_seconds = Gauge(
            "mirror_index_reconcile_seconds", "How long the start-up check of the blob index took.", registry=r,
        )

        self.replication_runs = Counter(
            "mirror_replication_runs", "Finished replication runs by rule and result (ok, partial, failed).",
            ["rule", "result"], registry=r,
        )
        self.replication_failures = Counter(
            "mirror_replication_failures", "Replication runs that did not copy everything (partial or failed).",
            ["rule"], registry=r,
        )
        self.replication_bytes = Counter(
            "mirror_replication_bytes", "Blob bytes replication wrote to destinations.", ["rule"], registry=r,
        )
        self.replication_images = Counter(
            "mirror_replication_images", "Images replication handled, by outcome (copied, unchanged, failed).",
            ["rule", "outcome"], registry=r,
        )
        self.replication_last_success = Gauge(
            "mirror_replication_last_success_timestamp_seconds", "When a rule last finished with everything copied.",
            ["rule"], registry=r,
        )
        self.replication_running = Gauge(
            "mirror_replication_running", "1 while a rule is running.", ["rule"], registry=r,
        )
        self.replication_paused = Gauge(
            "mirror_replication_paused", "1 while a rule's GETs wait for an upstream's rate limit "
            "(reason: ratelimit = at ratelimit_floor, retry-after = after a 429).",
            ["rule", "reason"], registry=r,
        )

    def add_maintenance_stats(self, read_stats: Callable[[], dict[str, int]]) -> None:
        self.registry.register(MaintenanceCollector(read_stats))

    def add_filesystem(self, path: Path) -> None:
        self.registry.register(FilesystemCollector(path))

    def render(self) -> tuple[bytes, str]:
        """Blocking (collectors may read files): call it from a thread."""
        source = self.registry if self.created_series else _WithoutCreated(self.registry)
        return generate_latest(source), CONTENT_TYPE_LATEST


class _WithoutCreated:
    """The registry's metrics minus their `_created` samples (what prometheus-client's global
    `disable_created_metrics()` would do, without touching process-wide state)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            metric.samples = [sample for sample in metric.samples if not sample.name.endswith("_created")]
            yield metric
