"""The counters of several proxy workers, summed for the one admin listener; and the
operator's backend states, set at that listener, applied by every worker.

Every worker but the first writes its counters to `<dir>/worker-<i>.json` about twice a
second (written aside, then renamed: a reader never sees half a file); the first worker,
which serves the admin listener, adds the files it finds to its own counters when
`/__tandem/metrics` or the status page is read. A restarted worker starts from zero, so a
sum may step back after a worker died (Prometheus' `rate()` reads that as a counter reset
of that series only if the sum drops: the figures say "since the workers started").

`POST /__tandem/backends/ID/state` at worker 0 also goes to `<dir>/admin-states.json`
(every state an operator set, by backend); each worker reads the file when it changes
(within WRITE_INTERVAL_S; a worker that starts, at once) and applies what changed in it.
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
from .errors import BadStateTransition, UnknownBackend
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


def _write(path: Path, data: Any) -> None:
    aside = path.with_suffix(".tmp")
    aside.write_text(json.dumps(data))
    os.replace(aside, path)


class WorkerStats:
    """One worker's side of the shared directory: write ours, or sum everyone's."""

    def __init__(self, ctx: ProxyContext, *, directory: Path, index: int) -> None:
        self.ctx = ctx
        self.directory = directory
        self.index = index
        self._states_path = directory / "admin-states.json"
        self._states_seen: object = None  # the file's (mtime, size) when last read
        self._states_applied: dict[str, str] = {}

    async def run_forever(self) -> None:
        """Our counters (workers other than the first) and the operator's states (all),
        every WRITE_INTERVAL_S."""
        path = self.directory / f"worker-{self.index}.json"
        while True:
            self.follow_admin_states()
            if self.index > 0:
                try:
                    _write(path, snapshot(self.ctx, self.index))
                except OSError as exc:  # (a full disk: the sums miss us, the proxy serves)
                    log.warning("worker_stats_write_failed", error=str(exc))
            await asyncio.sleep(WRITE_INTERVAL_S)

    def publish_admin_state(self, backend_id: str, state: str) -> None:
        """(worker 0, after an operator's POST) for the other workers."""
        states = self._read_states()
        states[backend_id] = state
        self._states_applied[backend_id] = state
        try:
            _write(self._states_path, states)
        except OSError as exc:
            log.warning("worker_states_write_failed", error=str(exc))

    def _read_states(self) -> dict[str, str]:
        try:
            data = json.loads(self._states_path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def follow_admin_states(self) -> None:
        try:
            st = self._states_path.stat()
        except OSError:
            return
        seen = (st.st_mtime_ns, st.st_size)
        if seen == self._states_seen:
            return
        self._states_seen = seen
        for backend_id, state in self._read_states().items():
            if self._states_applied.get(backend_id) == state:
                continue  # (applied already: a drain the backend said since stays)
            try:
                self.ctx.router.set_admin_state(backend_id, state)
            except (UnknownBackend, BadStateTransition) as exc:  # (not learnt here yet)
                log.warning("worker_state_not_applied", backend=backend_id, state=state,
                            error=str(exc))
                continue
            self._states_applied[backend_id] = state
            log.info("backend_state_changed", backend=backend_id, state=state,
                     by="admin (worker 0)")

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
