"""Reacting to membership changes (docs/consistency.md).

View changes (decided by a majority) do the repairs: the replicas of a removed or restarted
primary are promoted, the sessions whose secondary was removed get a new one, and a server
the view no longer binds drops every session it holds (fenced). A link's own failure repairs
nothing: the peer may be alive on the other side of a partition, serving. Reachability
changes only re-protect sessions left without a secondary, move replicas off a draining peer,
and tell a peer that is back which of its sessions were taken over meanwhile.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from ..cluster.link import PeerState
from ..cluster.quorum import Standing
from ..cluster.view import ViewChanged
from .committing import Committer
from .context import Context
from .slices import chunks
from .store import Primary

__all__ = ["Failover"]

log = structlog.get_logger("tandem.sessions")

# Sessions per `supersede` message (the peer applies one in a few ms)
SUPERSEDE_PART = 5_000


class Failover:
    """Membership events → promotions and re-protection."""

    def __init__(self, ctx: Context, committer: Committer) -> None:
        self.ctx = ctx
        self.committer = committer
        # the sessions a peer's return or drain leaves without a secondary: one list, made
        # at start-up and emptied in place (a new one of a million would be young to the
        # cycle collector, whose young runs would walk it: docs/memory.md)
        self._orphans: list[Primary] = []
        self._rehoming = asyncio.Lock()

    async def peer_changed(self, peer: str, state: PeerState, cause: str) -> None:
        ctx = self.ctx
        store = ctx.store
        taken = ctx.superseded.get(peer)
        if state is PeerState.ALIVE and taken:
            # (in parts: a million in one message would pass the frame limit, and building
            # or applying it would hold either loop for a second)
            told = len(taken)
            for part in taken.parts(SUPERSEDE_PART, upto=told):
                ctx.send(peer, {"op": "supersede", "sids": part})
                await asyncio.sleep(0)
            taken.drop(told)
            log.info("supersede_sent", peer=peer, sessions=told)
        if ctx.mode == "none" or ctx.draining:
            return
        if state not in (PeerState.ALIVE, PeerState.DRAINING):
            # Failed or left: repaired when the view removes it. Until then it may be alive
            # and its replicas promotable (a partition); moving them would race that.
            return
        # Back: the sessions left without a secondary. Draining: those whose secondary it
        # is (it still holds their copies: released once they have a new one).
        whose = None if state is PeerState.ALIVE else peer
        async with self._rehoming:  # (one at a time: they share the list)
            orphans = self._orphans
            async for chunk in chunks(store.primaries.walk_values()):
                for record in chunk:
                    if record.secondary != whose or store.primaries.get(record.sid) is not record:
                        continue
                    if whose is not None:
                        store.assign_secondary(record, None)
                        record.add_stale_holder(whose)
                    orphans.append(record)
            n = len(orphans)
            if n:
                started = time.monotonic()
                try:
                    await self.committer.replicate_batches(orphans)
                finally:
                    orphans.clear()
                log.info("reprotected", sessions=n, cause=f"{peer} {state.value}",
                         seconds=round(time.monotonic() - started, 3))

    def view_changed(self, event: ViewChanged) -> None:
        """A decided view: fence ourselves, or promote and re-home for the servers it ended.

        Runs synchronously as the view is adopted, before any other request or message is
        handled: a request for a session whose primary just ended finds it promoted here —
        by its slice if that ran already, else on the spot (promotion.py: `claim`).
        """
        ctx = self.ctx
        store = ctx.store
        quorum = ctx.membership.quorum
        if quorum.standing is not Standing.MEMBER:
            ctx.promotion.clear()
            held = len(store.primaries) + len(store.replicas)
            if held:
                for record in store.primaries.values():
                    record.superseded = True  # a request holding it gets 503, not "ended"
                store.primaries.clear()
                store.replicas.clear()
                log.warning("fenced", view=event.new.number, sessions_dropped=held,
                            standing=quorum.standing.value)
            if ctx.budget is not None:  # (sessions held in the store only: not ours either)
                ctx.budget.clear()
            return
        ended = set(event.removed) | set(event.restarted)
        if not ended or ctx.mode == "none" or ctx.draining:
            return
        for peer in ended:
            taken = ctx.superseded.get(peer)
            if taken:  # a later process of it holds nothing to release
                taken.drop(len(taken))
        # Promoting the replicas whose primary ended: waiting for each session's next
        # request (as WebLogic does) would leave it with a single copy for as long as its
        # user is idle, and a second failure would lose it. The token still names the
        # ended primary first, so the proxy's next candidate — its secondary, this server —
        # serves it, and the response carries the new token. The ended process acknowledges
        # nothing any more (its lease ran out before the view was decided), and the epoch,
        # from this view's number, orders this copy after its own.
        ctx.promotion.ended(sorted(ended), view=event.new.number,
                            cause=f"view {event.new.number} ended {', '.join(sorted(ended))}")
        if ctx.budget is not None:
            self._promote_stubs(sorted(ended), view=event.new.number)

    def _promote_stubs(self, peers: list[str], *, view: int) -> None:
        """The stubs of sessions held by the store whose primary the view ended: primaries
        here now, loaded by their next request (docs/memory.md)."""
        ctx = self.ctx
        assert ctx.budget is not None
        for peer in peers:
            stubs = ctx.budget.promote_stubs(
                peer, epoch_of=lambda epoch: ctx.next_epoch(epoch, view=view))
            if stubs:
                ctx.taken_over(peer).update(stubs)
                ctx.stats["promoted"] += len(stubs)
                log.info("promoted", sessions=len(stubs), stubs=len(stubs), old_primary=peer,
                         cause=f"view {view} ended it")
