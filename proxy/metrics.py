"""Counters of the proxy, kept as plain ints on the hot path and rendered at scrape time.

The exposition is the Prometheus text format (version 0.0.4).
"""

from __future__ import annotations

from collections.abc import Iterable

from .router import LATENCY_BOUNDS_S, Backend, BackendState

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


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

    def render(self, backends: Iterable[Backend], *, connections: int) -> str:
        backends = list(backends)
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("tandem_proxy_requests_total", "counter",
               "Responses sent to clients, by status class.")
        for i, label in enumerate(_CLASSES, start=1):
            out.append(f'tandem_proxy_requests_total{{class="{label}"}} {self.responses[i]}')
        family("tandem_proxy_failovers_total", "counter",
               "Requests moved to another backend, by cause.")
        for cause in sorted(set(self.failovers) | {"connect", "timeout", "reset", "503",
                                                   "unwritten"}):
            out.append(f'tandem_proxy_failovers_total{{cause="{cause}"}} '
                       f"{self.failovers.get(cause, 0)}")
        simple = (
            ("tandem_proxy_retries_total",
             "Requests written to a backend again after a failure once they had been written "
             "(another backend, or the same one on a fresh connection).", self.retries),
            ("tandem_proxy_stale_retries_total",
             "Requests tried once more on a fresh connection to the same backend after a "
             "pooled keep-alive connection died before any response byte.",
             self.stale_retries),
            ("tandem_proxy_bad_tokens_total",
             "Route tokens that did not verify (routed as new sessions).", self.bad_tokens),
            ("tandem_proxy_no_backend_total", "503 answered because no backend was left.",
             self.no_backend),
            ("tandem_proxy_client_errors_total",
             "Requests refused before forwarding (400, 413, 431, ...).", self.client_errors),
            ("tandem_proxy_internal_errors_total", "Unexpected errors while proxying.",
             self.internal_errors),
            ("tandem_proxy_views_applied_total", "Cluster views adopted from backends.",
             self.views_applied),
            ("tandem_proxy_upgrades_total", "Upgraded connections tunnelled.", self.upgrades),
        )
        for name, help_text, value in simple:
            family(name, "counter", help_text)
            out.append(f"{name} {value}")
        family("tandem_proxy_client_connections", "gauge", "Open client connections.")
        out.append(f"tandem_proxy_client_connections {connections}")

        family("tandem_proxy_backend_requests_total", "counter", "Requests sent, by backend.")
        for b in backends:
            out.append(f'tandem_proxy_backend_requests_total{{backend="{b.id}"}} {b.routed}')
        family("tandem_proxy_upstream_connect_errors_total", "counter",
               "Failed connection attempts, by backend.")
        for b in backends:
            out.append(f'tandem_proxy_upstream_connect_errors_total{{backend="{b.id}"}} '
                       f"{b.connect_errors}")
        family("tandem_proxy_upstream_io_errors_total", "counter",
               "Resets and timeouts after the request was sent, by backend.")
        for b in backends:
            out.append(f'tandem_proxy_upstream_io_errors_total{{backend="{b.id}"}} '
                       f"{b.io_errors}")
        family("tandem_proxy_backend_state", "gauge", "1 for the backend's current state.")
        for b in backends:
            for state in BackendState:
                value = 1 if b.state is state else 0
                out.append(f'tandem_proxy_backend_state{{backend="{b.id}",'
                           f'state="{state.value}"}} {value}')
        family("tandem_proxy_upstream_latency_seconds", "histogram",
               "Time from sending a request to its response head, by backend.")
        for b in backends:
            cumulative = 0
            for bound, count in zip((*LATENCY_BOUNDS_S, None), b.latency_counts, strict=True):
                cumulative += count
                le = "+Inf" if bound is None else repr(bound)
                out.append(f'tandem_proxy_upstream_latency_seconds_bucket{{backend="{b.id}",'
                           f'le="{le}"}} {cumulative}')
            out.append(f'tandem_proxy_upstream_latency_seconds_sum{{backend="{b.id}"}} '
                       f"{b.latency_sum_s!r}")
            out.append(f'tandem_proxy_upstream_latency_seconds_count{{backend="{b.id}"}} '
                       f"{cumulative}")
        out.append("")
        return "\n".join(out)
