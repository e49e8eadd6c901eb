"""Touch and expiry: secondaries learn the last access of sessions read without a change,
and sessions idle past `max_inactive_s` (with replicas whose primary stays silent) go.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from .context import Context
from .slices import chunks
from .store import Primary

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
            primaries, replicas = await self._sweep()
            if primaries or replicas:
                log.info("sessions_expired", primaries=primaries, replicas=replicas)

    async def _sweep(self) -> tuple[int, int]:
        """Expire the primaries past max_inactive and the orphaned replicas, in slices (a
        million records take a quarter of a second), each slice's at once: no list of a
        million to walk again (see promotion.py). How many of each went."""
        store = self.ctx.store
        expired = orphaned = 0
        async for records in chunks(store.primaries.walk_values()):
            now = time.time()
            dead = [r for r in records if r.expired(now) and store.primaries.get(r.sid) is r]
            if dead:
                self.expire(dead, quiet=True)
                expired += len(dead)
        async for replicas in chunks(store.replicas.walk_values()):
            mono = time.monotonic()
            for c in replicas:
                if c.orphaned(mono) and store.replicas.get(c.sid) is c:
                    del store.replicas[c.sid]
                    orphaned += 1
        return expired, orphaned

    def expire(self, primaries: list[Primary], *, quiet: bool = False) -> None:
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
        if not quiet:
            log.info("sessions_expired", primaries=len(primaries))
