"""Hand-overs: a server gives its sessions to another server, which becomes their primary.

Used by a drain (SIGTERM: every primary goes to its secondary before the server exits) and
by rebalancing (an overloaded server moves a session to a less loaded peer when one of its
requests commits, with the new token in that response). The taker protects the session with
its own secondary before it acknowledges, so the giver can drop its copy.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from tandem.logs import short
from tandem.token import Route

from ..errors import PeerTimeout, PeerUnavailable, SessionMoved
from ..tasks import for_each
from .committing import Committer
from .context import Context
from .slices import chunks
from .store import Primary

__all__ = ["Handover"]

log = structlog.get_logger("tandem.sessions")

HANDERS = 64  # sessions a drain hands over at once


class Handover:
    """Drain, take-over and rebalancing."""

    def __init__(self, ctx: Context, committer: Committer) -> None:
        self.ctx = ctx
        self.committer = committer

    # --- draining: hand everything over before stopping ---------------------------------

    async def drain(self, *, timeout: float) -> None:
        """Hand every primary to its secondary and let the primaries re-home our replicas."""
        ctx = self.ctx
        store, membership = ctx.store, ctx.membership
        ctx.draining = True
        started = time.monotonic()
        deadline = started + timeout
        membership.broadcast({"op": "draining"})
        if ctx.mode == "async":
            await self.committer.flush_async()

        async def hand_over(record: Primary) -> None:
            if store.primaries.get(record.sid) is not record:
                return  # fetched away meanwhile
            alive = [s.id for s in membership.alive_peers()]
            targets = [p for p in (record.secondary,) if p and p in alive]
            targets += [p for p in alive if p not in targets]
            for peer in targets:
                timeout = max(0.1, min(ctx.timeout * 2, deadline - time.monotonic()))
                if await self.hand_over(record, peer, timeout=timeout) is not None:
                    return
            log.warning("session_not_handed_over", sid=short(record.sid))

        await ctx.promotion.claim_all()  # (those of an ended primary are ours already)
        # Replicas whose primary is gone have no one to re-home them: we hold their only
        # copy, so we take them over and hand them on like our own primaries.
        async for replicas in chunks(store.replicas.walk_values()):
            for replica in replicas:
                if store.replicas.get(replica.sid) is replica \
                        and not membership.is_alive(replica.primary):
                    record = store.promote(replica, epoch=ctx.next_epoch(replica.epoch))
                    ctx.taken_over(replica.primary).add(record.sid, record.epoch)
        # (a million sessions: a few at a time from one walk of the store)
        await for_each(store.primaries.walk_values(), hand_over, at_once=HANDERS)
        # Primaries elsewhere re-protect the sessions we hold replicas of, then release us.
        while await self._replicas_of_live_primaries() and membership.alive_peers() \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained", handed_over=ctx.stats["handed_over"],
                 primaries_left=len(store.primaries), replicas_left=len(store.replicas),
                 seconds=round(time.monotonic() - started, 3))

    async def _replicas_of_live_primaries(self) -> bool:
        """Do we still hold a replica whose primary is alive (it has not re-homed it yet)?
        Looked for in slices, the first one ends the look."""
        membership = self.ctx.membership
        async for replicas in chunks(self.ctx.store.replicas.walk_values()):
            if any(membership.is_alive(r.primary) for r in replicas):
                return True
        return False

    async def hand_over(self, record: Primary, peer: str, *,
                        timeout: float) -> Route | None:
        """Make `peer` the session's primary; its new route, or None if it declined."""
        try:
            reply = await self.ctx.membership.links[peer].call(
                {"op": "takeover", **record.state(), "secondary": record.secondary},
                timeout=timeout)
        except (PeerUnavailable, PeerTimeout) as exc:
            self.ctx.peer_error(peer, exc)
            return None
        if not reply.get("ok"):
            return None
        # the taker protected it with its own secondary before answering (and if that is
        # us, its replication has already superseded our record)
        if self.ctx.store.primaries.get(record.sid) is record:
            self.ctx.store.remove(record.sid)
        # Any other server holding a copy from us lets go of it: left behind, it would be
        # promoted as ours when we fail, an older copy in a rival lineage.
        keep = {peer, reply.get("secondary")}
        for holder in (record.secondary, *record.stale_holders):
            if holder is not None and holder not in keep:
                keep.add(holder)
                self.ctx.send(holder, {"op": "release", "sid": record.sid})
        self.ctx.moved_to[record.sid] = peer
        if len(self.ctx.moved_to) > 100_000:
            del self.ctx.moved_to[next(iter(self.ctx.moved_to))]
        self.ctx.stats["handed_over"] += 1
        return Route(record.sid, peer, reply.get("secondary"))

    # --- rebalancing: overloaded servers hand sessions on, one request at a time ---------

    def migration_target(self, record: Primary) -> str | None:
        """A much less loaded peer to move this session to, or None (balanced enough)."""
        if not self.ctx.config.cluster.rebalance or self.ctx.draining or not self.ctx.loads:
            return None
        alive = {s.id for s in self.ctx.membership.alive_peers()}
        loads = {p: n for p, n in self.ctx.loads.items() if p in alive}
        if not loads:
            return None
        mine = len(self.ctx.store.primaries)
        mean = (mine + sum(loads.values())) / (len(loads) + 1)
        if mine <= mean * 1.2 + 2:
            return None
        peer, load = min(loads.items(), key=lambda kv: (kv[1], kv[0]))
        if load >= mean:
            return None
        self.ctx.loads[peer] = load + 1  # our estimate until its next report
        return peer

    async def on_takeover(self, peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        """A draining peer hands us a session it was primary for: we become its primary."""
        sid = msg["sid"]
        if self.ctx.draining:
            return {"ok": False, "draining": True}
        if sid in self.ctx.store.primaries or sid in self.ctx.opening:
            return {"ok": True}  # already ours, or being fetched by a request right now
        self.ctx.store.replicas.pop(sid, None)  # our replica is the same state, or older
        record = Primary(sid, data=msg["data"], version=int(msg["v"]),
                         epoch=self.ctx.next_epoch(int(msg.get("e", 0))),
                         max_inactive_s=float(msg["max_inactive_s"]),
                         created=float(msg["created"]), last_access=float(msg["last_access"]),
                         last_rid=msg.get("rid"), undo=msg.get("undo"))
        self.ctx.store.primaries[sid] = record
        record.stale_holders = {peer}
        self.ctx.stats["taken_over"] += 1
        # The old secondary holds this very state: keep it as ours (its copy is brought
        # up to date) rather than leave it a stale copy of the old primary's.
        old_secondary = msg.get("secondary")
        if old_secondary and old_secondary != self.ctx.me.id and any(
                p.id == old_secondary for p in self.ctx.membership.alive_peers()):
            self.ctx.store.assign_secondary(record, old_secondary)
        if self.ctx.mode != "none":
            try:
                await self.committer.replicate(record)  # protected before we acknowledge
            except SessionMoved as exc:
                return {"ok": False, "error": str(exc)}
        log.info("taken_over", sid=short(sid), from_=peer, version=record.version,
                 secondary=record.secondary)
        return {"ok": True, "secondary": record.secondary}
