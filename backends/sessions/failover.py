"""Reacting to membership changes: promote the replicas of a failed primary, re-protect the
sessions whose secondary failed or left, and tell a peer that is back which of its sessions
were taken over while it was unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from ..cluster.link import PeerState
from ..errors import ReplicationError
from .committing import Committer
from .context import Context
from .store import Primary

__all__ = ["Failover"]

log = structlog.get_logger("tandem.sessions")


class Failover:
    """Membership events → promotions and re-protection."""

    def __init__(self, ctx: Context, committer: Committer) -> None:
        self.ctx = ctx
        self.committer = committer

    async def peer_changed(self, peer: str, state: PeerState, cause: str) -> None:
        ctx = self.ctx
        store = ctx.store
        if state is PeerState.ALIVE and peer in ctx.superseded:
            superseded = ctx.superseded.pop(peer)
            ctx.send(peer, {"op": "supersede", "sids": superseded})
            log.info("supersede_sent", peer=peer, sessions=len(superseded))
        if ctx.mode == "none" or ctx.draining:
            return
        if state is PeerState.ALIVE:
            orphans = list(store.primaries_with_secondary(None))
        else:
            orphans = list(store.primaries_with_secondary(peer))
            for record in orphans:
                store.assign_secondary(record, None)
                if state is PeerState.DRAINING:  # it still holds the copy: release it after
                    record.stale_holders.add(peer)
            if state is not PeerState.DRAINING and not ctx.membership.recently_stalled():
                # (after our own stall the "failed" peer is most likely alive: it was we
                # who were silent; its sessions are promoted on request if it really died)
                orphans += self.promote_orphans(peer)
        if orphans:
            await self.reprotect(orphans, cause=f"{peer} {state.value}")

    def promote_orphans(self, peer: str) -> list[Primary]:
        """Promote the replicas whose primary just failed, so they have two copies again.

        Waiting for each session's next request (as WebLogic does) would leave it with a
        single copy for as long as its user is idle: a second failure would lose it. The
        token still names the failed primary first, so the proxy's next candidate — its
        secondary, this server — serves it, and the response carries the new token. If the
        peer was only hung, epochs keep its stale copies from being served when it resumes.
        """
        ctx = self.ctx
        replicas = [r for r in ctx.store.replicas.values() if r.primary == peer]
        promoted = []
        superseded = ctx.superseded.setdefault(peer, {})
        for replica in replicas:
            if time.time() - replica.last_access > replica.max_inactive_s:
                del ctx.store.replicas[replica.sid]
                continue
            record = ctx.store.promote(replica, epoch=ctx.next_epoch(replica.epoch))
            superseded[record.sid] = record.epoch
            promoted.append(record)
        if promoted:
            ctx.stats["promoted"] += len(promoted)
            log.info("promoted", sessions=len(promoted), old_primary=peer,
                     cause="primary failed")
        return promoted

    async def reprotect(self, records: list[Primary], *, cause: str) -> None:
        started = time.monotonic()
        sem = asyncio.Semaphore(64)
        primaries = self.ctx.store.primaries

        async def one(record: Primary) -> None:
            async with sem:
                if primaries.get(record.sid) is record:
                    with contextlib.suppress(ReplicationError):
                        await self.committer.replicate_now(record)

        await asyncio.gather(*(one(r) for r in records))
        log.info("reprotected", sessions=len(records), cause=cause,
                 seconds=round(time.monotonic() - started, 3))
