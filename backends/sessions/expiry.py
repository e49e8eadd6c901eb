"""Touch and expiry: secondaries learn the last access of sessions read without a change,
and sessions idle past `max_inactive_s` (with replicas whose primary stays silent) go.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from .context import Context
from .slices import chunks
from .store import Primary, Replica

__all__ = ["Expiry"]

log = structlog.get_logger("tandem.sessions")


class Expiry:
    """The touch and sweep loops of one server."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def touch_loop(self) -> None:
        ctx = self.ctx
        interval = min(ctx.config.cluster.heartbeat_interval_s,
                       ctx.config.session.max_inactive_s / 4)
        while True:
            await asyncio.sleep(interval)
            touched, ctx.touched = ctx.touched, {}
            for peer, items in touched.items():
                ctx.send(peer, {"op": "touch", "items": items})
            if ctx.config.cluster.rebalance:
                ctx.membership.broadcast({"op": "load", "n": len(ctx.store.primaries)})

    async def sweep_loop(self) -> None:
        interval = max(0.1, min(30.0, self.ctx.config.session.max_inactive_s / 10))
        while True:
            await asyncio.sleep(interval)
            primaries, replicas = await self._expired()
            if primaries or replicas:
                self.expire(primaries, replicas)

    async def _expired(self) -> tuple[list[Primary], list[Replica]]:
        """Remove and return the primaries past max_inactive and the orphaned replicas,
        looking at them in slices (a million records take a quarter of a second)."""
        store = self.ctx.store
        now, mono = time.time(), time.monotonic()
        old_p: list[Primary] = []
        old_r: list[Replica] = []
        async for records in chunks(store.primaries.walk_values()):
            old_p.extend(r for r in records if r.expired(now))
        async for replicas in chunks(store.replicas.walk_values()):
            old_r.extend(c for c in replicas if c.orphaned(mono))
        # (what a request or a message renewed between the slices stays)
        now, mono = time.time(), time.monotonic()
        dead_p = [r for r in old_p if store.primaries.get(r.sid) is r and r.expired(now)]
        for r in dead_p:
            store.remove(r.sid)
        dead_r = [c for c in old_r if store.replicas.get(c.sid) is c and c.orphaned(mono)]
        for c in dead_r:
            del store.replicas[c.sid]
        return dead_p, dead_r

    def expire(self, primaries: list[Primary], replicas: list[Replica]) -> None:
        """Forget these sessions here, at their secondaries and in the store."""
        ctx = self.ctx
        by_peer: dict[str, list[str]] = {}
        for record in primaries:
            ctx.store.remove(record.sid)
            if record.secondary is not None:
                by_peer.setdefault(record.secondary, []).append(record.sid)
        for peer, sids in by_peer.items():
            ctx.send(peer, {"op": "invalidate", "sids": sids})
        ctx.stats["expired"] += len(primaries)
        if ctx.persister is not None:
            ctx.persister.expired([r.sid for r in primaries])
        log.info("sessions_expired", primaries=len(primaries), replicas=len(replicas))
