"""A backend's `/__tandem/metrics`: its session counters and memory budget, in Prometheus text.

`SessionCollector` reads the session manager when the endpoint is scraped (nothing on the
request path touches `prometheus_client`), as the proxy's collector does
(proxy/metrics.py); `render` gives the text format, version 0.0.4.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..sessions.manager import SessionManager

__all__ = ["METRICS_PATH", "CONTENT_TYPE", "SessionCollector", "metrics_registry", "render"]

METRICS_PATH = "/__tandem/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SessionCollector(Collector):
    """The sessions of one backend server, as metric families."""

    def __init__(self, manager: SessionManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        m = self._manager
        server = m.me.id
        held = GaugeMetricFamily("tandem_backend_sessions", "Sessions held in memory",
                                 labels=["server", "kind"])
        held.add_metric([server, "primary"], len(m.store.primaries))
        held.add_metric([server, "replica"], len(m.store.replicas))
        budget = m.ctx.budget
        if budget is not None:
            held.add_metric([server, "stub"], len(budget.stubs))
        yield held
        events = CounterMetricFamily("tandem_backend_session_events",
                                     "Session events since the server started",
                                     labels=["server", "event"])
        for name, value in m.stats.items():
            events.add_metric([server, name], value)
        yield events
        if budget is None:
            return
        used = budget.used_bytes()
        accounted = GaugeMetricFamily(
            "tandem_backend_session_bytes",
            "Accounted bytes of the sessions held (keys, serialized values, per-record "
            "overhead; stubs at their fixed size)", labels=["server", "kind"])
        accounted.add_metric([server, "primary"], used["primaries"])
        accounted.add_metric([server, "replica"], used["replicas"])
        accounted.add_metric([server, "stub"], used["used"] - used["primaries"]
                             - used["replicas"])
        yield accounted
        yield _one("tandem_backend_session_budget_bytes",
                   "session.max_memory_mb in bytes (0: unbounded)", server, used["limit"])
        evicted = CounterMetricFamily("tandem_backend_session_evictions",
                                      "Sessions evicted to the store past the budget",
                                      labels=["server"])
        evicted.add_metric([server], m.stats.get("evicted", 0))
        yield evicted
        loads = CounterMetricFamily("tandem_backend_session_loads",
                                    "Evicted or promoted stubs loaded back from the store",
                                    labels=["server"])
        loads.add_metric([server], m.stats.get("stub_loaded", 0))
        yield loads


def _one(name: str, text: str, server: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=["server"])
    family.add_metric([server], value)
    return family


def metrics_registry(manager: SessionManager) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SessionCollector(manager))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
