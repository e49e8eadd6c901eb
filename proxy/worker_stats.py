"""The counters of several proxy workers, summed for the one admin listener.

Every worker but the first writes its counters to `<dir>/worker-<i>.json` about twice a
second (written aside, then renamed: a reader never sees half a file); the first worker,
which serves the admin listener, adds the files it finds to its own counters when
`/__tandem/metrics` or the status page is read. A restarted worker starts from zero, so a
sum may step back after a worker died (Prometheus' `rate()` reads that as a counter reset
of that series only if the sum drops: the figures say "since the workers started").
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from .context import ProxyContext
from .metrics import Metrics
from .router import BackendState

__all__ = ["WorkerStats", "SummedBackend", "WRITE_INTERVAL_S"]

log = structlog.get_logger("tandem.proxy")

WRITE_INTERVAL_S = 0.5
_SCALARS = ("retries", "stale_retries", "bad_tokens", "no_backend", "client_errors",
            "internal_errors", "views_applied", "upgrades")


@dataclass(slots=True)
class SummedBackend:
    """What the metrics read of a backend, summed over the workers (state: the first's)."""

    id: str
    state: BackendState
    routed: int = 0
    connect_errors: int = 0
    io_errors: int = 0
    latency_counts: list[int] = field(default_factory=list)
    latency_sum_s: float = 0.0


def snapshot(ctx: ProxyContext, index: int) -> dict[str, Any]:
    m = ctx.metrics
    return {
        "index": index, "pid": os.getpid(), "connections": len(ctx.connections),
        "responses": list(m.responses), "failovers": dict(m.failovers),
        **{name: getattr(m, name) for name in _SCALARS},
        "backends": {b.id: {"routed": b.routed, "connect_errors": b.connect_errors,
                            "io_errors": b.io_errors, "latency_counts": list(b.latency_counts),
                            "latency_sum_s": b.latency_sum_s} for b in ctx.router.backends},
    }


class WorkerStats:
    """One worker's side of the shared directory: write ours, or sum everyone's."""

    def __init__(self, ctx: ProxyContext, *, directory: Path, index: int) -> None:
        self.ctx = ctx
        self.directory = directory
        self.index = index

    async def write_forever(self) -> None:
        """(workers other than the first) our counters, every WRITE_INTERVAL_S."""
        path = self.directory / f"worker-{self.index}.json"
        aside = path.with_suffix(".tmp")
        while True:
            try:
                aside.write_text(json.dumps(snapshot(self.ctx, self.index)))
                os.replace(aside, path)
            except OSError as exc:  # (a full disk: the sums miss us, the proxy serves)
                log.warning("worker_stats_write_failed", error=str(exc))
            await asyncio.sleep(WRITE_INTERVAL_S)

    def workers(self) -> list[dict[str, Any]]:
        """Every worker's counters: ours (live), then the others' files."""
        found = [snapshot(self.ctx, self.index)]
        for path in sorted(self.directory.glob("worker-*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # (a worker being replaced; its next write is whole)
        return found

    def summed(self) -> tuple[Metrics, list[SummedBackend], int]:
        """The metrics of all workers: counters, backends, client connections."""
        total = Metrics()
        backends = {b.id: SummedBackend(b.id, b.state, latency_counts=[0] * len(b.latency_counts))
                    for b in self.ctx.router.backends}
        connections = 0
        for w in self.workers():
            connections += w["connections"]
            total.responses = [a + b for a, b in zip(total.responses, w["responses"],
                                                     strict=True)]
            for cause, n in w["failovers"].items():
                total.failovers[cause] = total.failovers.get(cause, 0) + n
            for name in _SCALARS:
                setattr(total, name, getattr(total, name) + w[name])
            for bid, c in w["backends"].items():
                sb = backends.get(bid)
                if sb is None:
                    continue  # (a backend only another worker has learned yet)
                sb.routed += c["routed"]
                sb.connect_errors += c["connect_errors"]
                sb.io_errors += c["io_errors"]
                sb.latency_sum_s += c["latency_sum_s"]
                sb.latency_counts = [a + b for a, b in zip(sb.latency_counts,
                                                           c["latency_counts"], strict=True)]
        return total, list(backends.values()), connections
