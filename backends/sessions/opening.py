"""Opening a request's session: the primary held here, or the session taken over.

A request carrying token (SID, P, S) at server X (X holding the lease: docs/consistency.md):
- X holds the primary: use it.
- P is a member of the view but X cannot reach it: wait until the view removes P (its
  replicas are promoted as the view is adopted), or answer 503 `owner-unreachable`. P may
  be alive on the other side of a partition, still serving: only the majority may end it.
- X holds the replica and P is no longer in the view: promote it, pick a new secondary.
- otherwise fetch the session from P, then S (the holder keeps a demoted copy until the new
  secondary has the state, then is told to release it); X becomes primary.
- found nowhere: loaded from the persistent store if there is one, else `session_lost`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from tandem.logs import short
from tandem.token import Route

from ..errors import NotServing, PeerTimeout, PeerUnavailable, SessionMoved
from .committing import Committer
from .context import Context, age
from .expiry import Expiry
from .store import Primary

__all__ = ["Opener", "HELD_REQUESTS_S"]

# After a stall of ours, no session is taken over for this long (seconds): the requests
# read then are the ones held while we were stopped, which the proxy may have moved.
HELD_REQUESTS_S = 1.0

log = structlog.get_logger("tandem.sessions")


class Opener:
    """Finds the primary record for a request's token, taking the session over if need be."""

    def __init__(self, ctx: Context, committer: Committer, expiry: Expiry) -> None:
        self.ctx = ctx
        self.committer = committer
        self.expiry = expiry

    def new_session(self) -> Primary:
        ctx = self.ctx
        record = ctx.store.create()
        if ctx.mode != "none":  # chosen now, so that links built by the handler name it
            ctx.store.assign_secondary(record, ctx.choose_secondary())
        ctx.stats["created"] += 1
        log.debug("session_created", sid=short(record.sid))
        return record

    async def open(self, route: Route | None, *, rid: str | None = None) -> Primary | None:
        """The primary record for a request's token, taken over here if need be.

        `rid` is the proxy's id of the client request: the same on every retry. When the
        last commit came from this very request, it was applied but its response was lost
        (the server died, or the connection did): undo it, so the retry applies it once.
        """
        record = await self._open(route)
        if rid is not None and record is not None and record.last_rid == rid:
            record.roll_back(replicated=self.ctx.mode != "none",
                             sites=self.ctx.sites is not None)
            self.ctx.stats["retries_rolled_back"] += 1
            log.info("retry_rolled_back", sid=short(record.sid), version=record.version)
        return record

    async def _open(self, route: Route | None) -> Primary | None:
        if route is None:
            return None
        ctx = self.ctx
        if time.monotonic() >= ctx.membership.ack_until:
            # No lease: the majority may have moved this session on (no stale reads, no
            # take-overs); wait briefly for it (a renewal, the cluster forming) or 503.
            await ctx.membership.ready()
        record = ctx.store.primaries.get(route.sid)
        if record is None and ctx.promotion.active:
            record = ctx.promotion.claim(route.sid)  # its primary ended: promoted now
        budget = ctx.budget
        if budget is not None:
            if record is None and route.sid in budget.stubs:
                record = await budget.reinstate(route.sid)  # evicted: back from the store
            if record is not None:
                budget.used_now(record)
        if record is not None:
            if record.expired(time.time()):
                self.expiry.expire([record])
                return None
            secondary = record.secondary
            if secondary is not None and not ctx.membership.is_alive(secondary) and (
                    ctx.mode != "none"):
                # Its secondary is unreachable: only the view may replace it (rule R).
                # Settled before the handler runs, so that links it renders name the new one.
                await self.committer.await_removal(record, secondary)
                self.committer.planned_secondary(record)
            return record
        pending = ctx.opening.get(route.sid)
        if pending is not None:  # a concurrent request is already taking it over
            return await asyncio.shield(pending)
        fut: asyncio.Future[Primary | None] = asyncio.get_running_loop().create_future()
        ctx.opening[route.sid] = fut
        try:
            record = await self._take_over(route)
            fut.set_result(record)
            return record
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            del ctx.opening[route.sid]

    async def _take_over(self, route: Route) -> Primary | None:
        ctx = self.ctx
        store, membership = ctx.store, ctx.membership
        sid = route.sid
        if membership.recently_stalled(within=HELD_REQUESTS_S):
            # We were frozen: the peers have most likely moved this session elsewhere, and
            # the request may be one the proxy gave up on while we were stopped and sent
            # to the new primary (which applied it). Taking the session over to apply it
            # again would duplicate that write; the proxy retries live requests elsewhere.
            # (Requests held in our sockets during a stall are read in its first moments.)
            raise SessionMoved("not taking sessions over right after our own stall",
                               peer=ctx.me.id)
        if ctx.sites is not None and ctx.sites.is_remote(route.primary):
            # a remote site's session (backends/sites/takeover.py: only once it is down)
            found = await ctx.sites.take_over(route)
            if not isinstance(found, Route):
                return found
            route = found  # served by a peer of this site already: fetched from it below
        local = store.replicas.get(sid)
        unreachable = [p for p in (route.primary, local.primary if local else None)
                       if p is not None and p != ctx.me.id and membership.in_view(p)
                       and not membership.is_alive(p)]
        if unreachable:
            record = await self._await_removal(sid, unreachable)
            if record is not None:  # promoted here as the view removed its primary
                return record
            local = store.replicas.get(sid)
        best: dict[str, Any] | None = None
        source = "replica"
        holders: dict[str, tuple[int, int]] = {}  # server -> (epoch, version) of its copy
        answered: set[str] = set()  # servers that answered our fetch (found or not)
        if local is None or membership.is_alive(local.primary):
            # Ask the servers the token names and the primary our replica names; a replica
            # elsewhere names its own primary, which is asked too (the token may be stale).
            queue = [ctx.moved_to.get(sid), route.primary, route.secondary,
                     local.primary if local else None]
            asked: set[str] = set()
            while queue:
                peer = queue.pop(0)
                if peer is None or peer == ctx.me.id or peer in asked:
                    continue
                asked.add(peer)
                if not membership.is_alive(peer):
                    continue
                state = await self._fetch(peer, sid)
                if state is not None or membership.is_alive(peer):
                    answered.add(peer)
                if state is None:
                    continue
                holders[peer] = age(state)
                old_secondary = state.get("secondary")
                if isinstance(old_secondary, str) and old_secondary != ctx.me.id:
                    # released by the old primary already; told again after our replication
                    holders.setdefault(old_secondary, (-1, -1))
                authoritative = state.get("kind") == "primary"
                if best is None or age(state) > age(best) or (
                        authoritative and age(state) == age(best)):
                    best, source = state, peer
                if authoritative:
                    break
                queue.append(state.get("primary"))
        if best is None and local is None and ctx.persister is not None:
            best, source = await ctx.persister.load(sid), "store"  # found nowhere in memory
        raced = store.primaries.get(sid)
        if raced is not None:  # handed over to us while we asked around
            return raced
        silent = {p for p in (route.primary, local.primary if local else None)
                  if p is not None and p != ctx.me.id and p not in answered}
        if any(membership.in_view(p) for p in silent) and (best or local) and not (
                best is not None and best.get("kind") == "primary"):
            # An owner the view still lists did not answer (hung, or cut off from us): it
            # may be serving this session. Only the majority may end it (docs/consistency.md).
            raise NotServing("the session's owner is unreachable and still in the view",
                             peer=ctx.me.id, state="owner-unreachable")
        if silent and membership.recently_stalled() and (best or local):
            # We were frozen: the owner we cannot reach is most likely alive and serving this
            # session; taking it over now would make two primaries. Let the proxy retry.
            raise SessionMoved("owner unreachable right after our own stall", peer=ctx.me.id)
        if local is not None and (best is None or (local.epoch, local.version) >= age(best)):
            if time.time() - local.last_access > local.max_inactive_s:
                store.replicas.pop(sid, None)
                log.info("session_expired", sid=short(sid))
                return None
            origin = (local.epoch, local.version)
            record = store.promote(local, epoch=ctx.next_epoch(local.epoch))
            ctx.stats["promoted"] += 1
            log.info("promoted", sid=short(sid), version=record.version,
                     old_primary=local.primary)
        elif best is not None:
            origin = age(best)
            store.replicas.pop(sid, None)
            record = Primary(sid, data=best["data"], version=int(best["v"]),
                             epoch=ctx.next_epoch(max(int(best.get("e", 0)),
                                                      local.epoch if local else 0)),
                             max_inactive_s=float(best["max_inactive_s"]),
                             created=float(best["created"]),
                             last_access=float(best["last_access"]),
                             last_rid=best.get("rid"), undo=best.get("undo"))
            if time.time() - record.last_access > record.max_inactive_s:
                for peer in holders:
                    ctx.send(peer, {"op": "invalidate", "sids": [sid]})
                log.info("session_expired", sid=short(sid))
                return None
            store.primaries[sid] = record
            if source == "store" and ctx.budget is not None:
                ctx.budget.clean.add(sid)  # (offload: its secondary needs only a stub)
            ctx.stats["fetched"] += 1
            log.info("fetched", sid=short(sid), version=record.version, from_=source)
        else:
            ctx.stats["lost"] += 1
            log.warning("session_lost", sid=short(sid), primary=route.primary,
                        secondary=route.secondary)
            return None
        # Named owners we could not reach may only be hung: told to let go when they are back.
        for peer in silent:
            ctx.taken_over(peer).add(sid, record.epoch)
        # Protect the taken-over state before the handler runs: the new secondary gets it
        # now (a holder that already has this version is kept), the other holders let go.
        if ctx.mode != "none":
            secondary = ctx.choose_secondary()
            store.assign_secondary(record, secondary)
            if secondary is not None and holders.get(secondary) == origin:
                # it keeps exactly this copy: the next delta (new epoch) brings it along
                record.sent_version = record.acked_version = record.version
            record.stale_holders = {p for p in holders if p != secondary}
            await self.committer.replicate(record)
        return record

    async def _await_removal(self, sid: str, owners: list[str]) -> Primary | None:
        """Wait (bounded) for the view to remove the unreachable `owners`; the session's
        primary record if it was promoted here meanwhile, None if it was not."""
        ctx = self.ctx
        membership = ctx.membership
        c = ctx.config.cluster
        # suspicion, then the grant of a lease the owner may hold, then one ballot
        timeout = c.heartbeat_interval_s * (2 * c.missed_heartbeats + 1)

        def waiting() -> bool:
            return sid not in ctx.store.primaries and any(
                membership.in_view(p) and not membership.is_alive(p) for p in owners)

        if not await membership.wait_view(waiting, timeout, redial=owners):
            raise NotServing(f"{', '.join(owners)} unreachable and still in the view",
                             peer=ctx.me.id, state="owner-unreachable")
        # (promoted by the view that removed its primary, or now)
        record = ctx.promotion.claim(sid)
        if record is None and ctx.budget is not None:
            record = await ctx.budget.reinstate(sid)  # promoted here as a stub
        return record

    async def _fetch(self, peer: str, sid: str) -> dict[str, Any] | None:
        ctx = self.ctx
        try:
            reply = await ctx.membership.links[peer].call(
                {"op": "fetch", "sid": sid}, timeout=ctx.timeout)
        except (PeerUnavailable, PeerTimeout) as exc:
            ctx.peer_error(peer, exc)
            return None
        return reply if reply.get("found") else None
