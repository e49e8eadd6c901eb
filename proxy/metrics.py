"""Counters of the proxy, kept as plain ints on the hot path and read at scrape time.

`ProxyCollector` turns them into Prometheus metric families when `/__tandem/metrics` is
scraped; `metrics_registry` puts it in a private registry for `prometheus_client`'s
`generate_latest` (the text format, version 0.0.4). Nothing on the request path touches
`prometheus_client`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .router import LATENCY_BOUNDS_S, Backend, BackendState

__all__ = ["Metrics", "ProxyCollector", "metrics_registry", "CONTENT_TYPE"]

# What generate_latest writes (prometheus_client's CONTENT_TYPE_LATEST names a newer
# version in recent releases; the body is the 0.0.4 text format all the same).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Failover causes always exported (0 until they happen), so that rates can be taken.
_FAILOVER_CAUSES = ("connect", "timeout", "reset", "503", "unwritten")
_LE = (*(repr(bound) for bound in LATENCY_BOUNDS_S), "+Inf")  # bucket labels


class Metrics:
    """Process-wide counters; per-backend ones live on `Backend`."""

    __slots__ = ("responses", "failovers", "retries", "stale_retries", "bad_tokens",
                 "no_backend", "client_errors", "internal_errors", "views_applied",
                 "upgrades")

    def __init__(self) -> None:
        self.responses = [0] * 10  # by status // 100 (0 and 6-9 only if a backend errs)
        self.failovers: dict[str, int] = {}  # by cause
        self.retries = 0  # requests written again after a failure (they may have been read)
        self.stale_retries = 0  # dead keep-alive connection: once more on a fresh one
        self.bad_tokens = 0
        self.no_backend = 0  # 503 answered because no candidate was left
        self.client_errors = 0  # requests refused before forwarding (400, 413, 431, ...)
        self.internal_errors = 0
        self.views_applied = 0
        self.upgrades = 0  # tunnels established (WebSocket and other upgrades)

    def count_failover(self, cause: str) -> None:
        self.failovers[cause] = self.failovers.get(cause, 0) + 1


class ProxyCollector(Collector):
    """The proxy's counters as metric families, read when scraped."""

    def __init__(self, metrics: Metrics, *, backends: Callable[[], Iterable[Backend]],
                 connections: Callable[[], int],
                 summed: Callable[[], tuple[Metrics, list[Any], int]] | None = None) -> None:
        self._metrics = metrics
        self._backends = backends
        self._connections = connections
        # (several workers: every worker's counters, summed — proxy/worker_stats.py)
        self._summed = summed

    def collect(self) -> Iterator[Metric]:
        if self._summed is not None:
            m, backends, n_connections = self._summed()
        else:
            m, backends, n_connections = (self._metrics, list(self._backends()),
                                          self._connections())

        requests = CounterMetricFamily("tandem_proxy_requests",
                                       "Responses sent to clients, by status class.",
                                       labels=["class"])
        for i, label in enumerate(_CLASSES, start=1):
            requests.add_metric([label], m.responses[i])
        yield requests

        failovers = CounterMetricFamily("tandem_proxy_failovers",
                                        "Requests moved to another backend, by cause.",
                                        labels=["cause"])
        for cause in sorted(set(m.failovers) | set(_FAILOVER_CAUSES)):
            failovers.add_metric([cause], m.failovers.get(cause, 0))
        yield failovers

        simple = (
            ("tandem_proxy_retries",
             "Requests written to a backend again after a failure once they had been written "
             "(another backend, or the same one on a fresh connection).", m.retries),
            ("tandem_proxy_stale_retries",
             "Requests tried once more on a fresh connection to the same backend after a "
             "pooled keep-alive connection died before any response byte.", m.stale_retries),
            ("tandem_proxy_bad_tokens",
             "Route tokens that did not verify (routed as new sessions).", m.bad_tokens),
            ("tandem_proxy_no_backend", "503 answered because no backend was left.",
             m.no_backend),
            ("tandem_proxy_client_errors",
             "Requests refused before forwarding (400, 413, 431, ...).", m.client_errors),
            ("tandem_proxy_internal_errors", "Unexpected errors while proxying.",
             m.internal_errors),
            ("tandem_proxy_views_applied", "Cluster views adopted from backends.",
             m.views_applied),
            ("tandem_proxy_upgrades", "Upgraded connections tunnelled.", m.upgrades),
        )
        for name, help_text, value in simple:
            yield CounterMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily("tandem_proxy_client_connections", "Open client connections.",
                                value=n_connections)

        routed = CounterMetricFamily("tandem_proxy_backend_requests",
                                     "Requests sent, by backend.", labels=["backend"])
        connect_errors = CounterMetricFamily("tandem_proxy_upstream_connect_errors",
                                             "Failed connection attempts, by backend.",
                                             labels=["backend"])
        io_errors = CounterMetricFamily(
            "tandem_proxy_upstream_io_errors",
            "Resets and timeouts after the request was sent, by backend.", labels=["backend"])
        state = GaugeMetricFamily("tandem_proxy_backend_state",
                                  "1 for the backend's current state.",
                                  labels=["backend", "state"])
        latency = HistogramMetricFamily(
            "tandem_proxy_upstream_latency_seconds",
            "Time from sending a request to its response head, by backend.",
            labels=["backend"])
        for b in backends:
            routed.add_metric([b.id], b.routed)
            connect_errors.add_metric([b.id], b.connect_errors)
            io_errors.add_metric([b.id], b.io_errors)
            for s in BackendState:
                state.add_metric([b.id, s.value], 1 if b.state is s else 0)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(_LE, b.latency_counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            latency.add_metric([b.id], buckets, b.latency_sum_s)
        yield from (routed, connect_errors, io_errors, state, latency)


def metrics_registry(metrics: Metrics, *, backends: Callable[[], Iterable[Backend]],
                     connections: Callable[[], int],
                     summed: Callable[[], tuple[Metrics, list[Any], int]] | None = None
                     ) -> CollectorRegistry:
    """A private registry holding only the proxy's collector (not the process-wide one:
    two proxies in one process, as in the tests, keep their own numbers)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(metrics, backends=backends, connections=connections,
                                     summed=summed))
    return registry
