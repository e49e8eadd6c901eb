"""Committing and replicating: a request's changes applied to the primary and brought to
its secondary (sync: acknowledged before the response leaves; async: queued in batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from tandem.config import ServerConfig
from tandem.logs import short
from tandem.token import Route

from ..errors import NotServing, PeerTimeout, PeerUnavailable, ReplicationError, SessionMoved
from ..tasks import for_each
from .context import Context
from .session import Session
from .slices import chunks
from .store import Primary

__all__ = ["Committer", "CommitResult", "BATCH"]

log = structlog.get_logger("tandem.sessions")

BATCH = 500  # sessions per re-protection frame (~250 KB with 200-byte values)


@dataclass(frozen=True, slots=True)
class CommitResult:
    route: Route | None       # the token the client must hold after this response
    cleared: bool = False     # the session was invalidated: clear the client's token


class Committer:
    """Applies a request's changes and keeps each primary's secondary up to date."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._async_dirty: dict[str, None] = {}           # sids awaiting an async flush
        self._flush_now = asyncio.Event()

    # --- per request --------------------------------------------------------------------

    async def commit(self, session: Session, *, discard: bool = False,
                     rid: str | None = None) -> CommitResult:
        """Apply the request's changes and replicate them (sync: acknowledged first)."""
        ctx = self.ctx
        record = session.record
        if record is None:
            return CommitResult(None)
        if ctx.store.primaries.get(record.sid) is not record and not (
                ctx.budget is not None and ctx.budget.revive(record)):
            sid = record.sid
            if not (record.superseded or sid in ctx.store.primaries or sid in ctx.store.replicas
                    or sid in ctx.moved_to):
                # Ended here meanwhile (another request invalidated it, or it expired): this
                # request's changes die with it, and the client's token is cleared.
                return CommitResult(None, cleared=True)
            # taken over by another server, or fenced, meanwhile
            ctx.stats["moved"] += 1
            raise SessionMoved("session is no longer primary here", peer=ctx.me.id)
        if session.invalidated:
            await self.invalidate(record)
            return CommitResult(None, cleared=True)
        if ctx.budget is not None and not discard and ctx.budget.over():
            await self._make_room(record)
        first, first_version = record, record.version
        if not discard:
            changes = session.collect_changes()
            for error in changes.errors:
                log.error("session_value_unserializable", sid=short(record.sid), error=error)
            if changes.max_inactive_s is not None:
                record.max_inactive_s = changes.max_inactive_s
            if changes.set or changes.deleted:
                record.apply(changes.set, changes.deleted, rid=rid,
                             replicated=ctx.mode != "none", sites=ctx.sites is not None)
            new_id = session.regenerate_requested
            if new_id is not None:
                record = await self._regenerate(record, new_id)
                session._attach(record)
            session.reset()
        record.last_access = time.time()
        if record.version == 0:
            record.version = 1  # a new session is committed once, even with no keys
        changed = record is not first or record.version != first_version
        stored = False
        if ctx.offload:  # the store first: the secondary gets only what it cannot give
            assert ctx.persister is not None
            stored = await ctx.persister.committed(record, changed=changed)
        if ctx.budget is not None:
            ctx.budget.committed(record, stored=stored or (
                not changed and record.sid in ctx.budget.clean))
        if ctx.mode != "none":
            if record.version != record.sent_version or record.secondary is None:
                try:
                    await self.replicate(record)
                except NotServing as exc:
                    if exc.state == "memory-budget" and first_version == 0:
                        # its secondary has no room for a new session's copy: nothing of
                        # it stays here either (503 memory-budget, the proxy goes on)
                        ctx.store.remove(record.sid)
                        ctx.stats["refused_memory"] += 1
                    raise
            elif record.secondary is not None:
                ctx.touched.setdefault(record.secondary, {})[record.sid] = record.last_access
        if ctx.sites is not None:  # the remote sites' copies (MAN: acknowledged first)
            await ctx.sites.committed(record)
        if ctx.persister is not None and not ctx.offload:
            # after replication: a write (sync: awaited) or a touch
            await ctx.persister.committed(record, changed=changed)
        if time.monotonic() >= ctx.membership.ack_until:
            # Acknowledged only under the lease (docs/consistency.md, I1b): without it the
            # majority may have ended us and promoted the copy this write is not in.
            await ctx.membership.ready()
        return CommitResult(Route(record.sid, ctx.me.id, record.secondary))

    async def _make_room(self, record: Primary) -> None:
        """Past the memory budget: wait (bounded) for the evictor; a new session that still
        finds no room is refused (503 `memory-budget`; the proxy tries another server)."""
        ctx = self.ctx
        assert ctx.budget is not None
        if await ctx.budget.room(ctx.timeout) or record.version != 0:
            return  # (an existing session is committed: refusing it would not free memory)
        ctx.store.remove(record.sid)
        ctx.stats["refused_memory"] += 1
        log.warning("session_refused", sid=short(record.sid), reason="memory budget",
                    **ctx.budget.used_bytes())
        raise NotServing("memory budget reached: no new session here", peer=ctx.me.id,
                         state="memory-budget")

    async def _regenerate(self, old: Primary, sid: str) -> Primary:
        """The session under the id `regenerate_id()` chose (and handed out already: in the
        app's links, its `id`), with the secondary a token of the request named; the old
        id ends."""
        store = self.ctx.store
        secondary = self.planned_secondary(old)
        record = store.create(sid)
        record.data, record.version = old.data, old.version
        record.max_inactive_s, record.created = old.max_inactive_s, old.created
        await self.invalidate(old)
        if secondary is not None:
            store.assign_secondary(record, secondary)
        log.info("session_id_regenerated", old=short(old.sid), new=short(record.sid))
        return record

    async def invalidate(self, record: Primary) -> None:
        ctx = self.ctx
        ctx.store.remove(record.sid)
        ctx.stats["invalidated"] += 1
        log.info("session_invalidated", sid=short(record.sid))
        if ctx.persister is not None:
            await ctx.persister.invalidated(record.sid)
        if ctx.sites is not None:
            await ctx.sites.invalidated(record.sid)
        holders = {record.secondary, *record.stale_holders} - {None}
        msg = {"op": "invalidate", "sids": [record.sid]}
        if ctx.mode == "sync":  # a replica must not outlive an acknowledged invalidation
            await asyncio.gather(*(ctx.call_quietly(p, dict(msg)) for p in holders if p))
        else:
            for peer in holders:
                if peer:
                    ctx.send(peer, dict(msg))

    # --- replication (primary side) -----------------------------------------------------

    async def replicate(self, record: Primary) -> None:
        """Bring the secondary up to date (sync: wait for its ack; async: queue it)."""
        ctx = self.ctx
        if ctx.mode == "async":
            self._async_dirty[record.sid] = None
            if len(self._async_dirty) >= ctx.config.session.async_flush_threshold:
                self._flush_now.set()
            if record.secondary is None or not ctx.membership.is_alive(record.secondary):
                ctx.store.assign_secondary(record, ctx.choose_secondary())
            return
        await self.replicate_now(record)

    async def replicate_now(self, record: Primary) -> None:
        ctx = self.ctx
        membership = ctx.membership
        waited = False
        full: frozenset[str] = frozenset()  # peers without room for this new session's copy
        for _ in range(len(membership.roster) + 2):
            peer = self.planned_secondary(record)
            if peer is not None and not membership.is_alive(peer):
                await self.await_removal(record, peer)
                continue  # the view removed it: a new secondary is chosen
            if peer is None:
                if waited or not self._others_in_view():
                    break  # no live peer, or none may be chosen right after our own stall
                # a member restarting or re-dialled right now: give it a heartbeat to come
                waited = True
                await membership.wait_view(lambda: ctx.choose_secondary() is None,
                                           ctx.config.cluster.heartbeat_interval_s)
                continue
            if ctx.offload and ctx.budget is not None and record.sid in ctx.budget.clean:
                msg = self._stub_msg(record)  # the store holds this version
            else:
                msg = self._replicate_msg(record)
            try:
                reply = await membership.links[peer].call(msg, timeout=ctx.timeout)
            except (PeerUnavailable, PeerTimeout) as exc:
                ctx.stats["replication_failures"] += 1
                ctx.peer_error(peer, exc)
                record.sent_version = -1  # whatever it got, the next attempt sends it all
                continue
            if ctx.store.primaries.get(record.sid) is not record:
                if record.superseded:
                    # Another server took the session over while this write replicated
                    # (we were thought failed): it lacks the write, so it is not
                    # acknowledged; the proxy retries the request there.
                    raise SessionMoved("session taken over during replication", peer=peer)
                return  # invalidated, or fetched with this write by another server
            if reply.get("ok"):
                record.acked_version = max(record.acked_version, int(msg["v"]))
                ctx.stats["replicated"] += 1
                if ctx.debug:  # per request: not even a filtered call when not wanted
                    log.debug("replicated", sid=short(record.sid), to=peer, version=msg["v"],
                              full="data" in msg)
                self._release_stale(record)
                return
            if reply.get("need_full"):
                record.sent_version = -1
                continue
            if reply.get("moved"):
                ctx.store.remove(record.sid)
                ctx.stats["moved"] += 1
                log.warning("session_moved", sid=short(record.sid), to=reply["moved"])
                raise SessionMoved(f"session is primary at {reply['moved']}", peer=peer)
            record.sent_version = -1
            if reply.get("state") == "memory-budget":
                # No room there for a new session's copy: another peer may have it.
                full = full | {peer}
                other = ctx.choose_secondary(besides=full)
                if other is not None:
                    ctx.store.assign_secondary(record, other)
                    continue
            log.error("replication_rejected", sid=short(record.sid), peer=peer,
                      reply=reply.get("error"))
            raise NotServing(f"{peer} refused the copy: {reply.get('error')}",
                             peer=peer, state=str(reply.get("state") or "unprotected"))
        if ctx.membership.recently_stalled():
            # Right after our own stall a secondary that does not answer has most likely
            # taken this session over: acknowledging would lose the write. The proxy fails
            # the request over instead.
            raise SessionMoved("could not replicate right after our own stall", peer=ctx.me.id)
        if ctx.mode == "sync" and self._others_in_view():
            # Sync acknowledges only what two copies hold (I1a): with another member in the
            # view, a copy held here alone would be lost when the view ends us.
            raise NotServing("no member of the view can hold the copy", peer=ctx.me.id,
                             state="unprotected")
        # Alone in the view (a one-server cluster): say so in the token (and in the log once
        # per session that had a secondary, not at every commit while alone).
        if record.secondary is not None:
            log.warning("session_unprotected", sid=short(record.sid), was=record.secondary)
        ctx.store.assign_secondary(record, None)

    async def replicate_batches(self, records: Iterable[Primary]) -> None:
        """Give these sessions (left without a secondary) one, `BATCH` full copies per frame
        and a few frames in flight: re-protecting a failed server's sessions one frame each
        would take minutes for a million. A session a batch cannot place (no live peer, a
        refusal, a lost link) goes the one-by-one way, `replicate_now`, with its waits."""
        ctx = self.ctx
        primaries, membership = ctx.store.primaries, ctx.membership
        # Frames in flight: a batch is built only when one is free, so that the copies
        # waiting to be sent are a few batches, never the whole set.
        in_flight = asyncio.Semaphore(4)
        one_by_one: list[Primary] = []
        sends: set[asyncio.Task[None]] = set()
        batches: dict[str, list[tuple[Primary, dict[str, Any]]]] = {}

        async def send(peer: str, items: list[tuple[Primary, dict[str, Any]]]) -> None:
            try:
                await self._send_batch(peer, items, one_by_one)
            finally:
                in_flight.release()

        async def start(peer: str) -> None:
            await in_flight.acquire()
            task = asyncio.create_task(send(peer, batches.pop(peer)))
            sends.add(task)
            task.add_done_callback(sends.discard)

        async for chunk in chunks(records):  # (the loop is not held while a million go)
            peers = membership.alive_peers()  # (once a chunk: the same for its sessions)
            for record in chunk:
                if primaries.get(record.sid) is not record or (
                        record.secondary is not None and record.sent_version >= 0):
                    continue  # ended meanwhile, or a request of it replicated it already
                peer = self.planned_secondary(record, peers)
                if peer is None or not membership.is_alive(peer):
                    one_by_one.append(record)
                    continue
                batch = batches.setdefault(peer, [])
                if not batch and in_flight.locked():
                    await in_flight.acquire()  # (wait for a free frame before building one)
                    in_flight.release()
                    if primaries.get(record.sid) is not record or record.sent_version >= 0:
                        continue
                msg = self._replicate_msg(record)
                del msg["op"]
                batch.append((record, msg))
                if len(batch) >= BATCH:
                    await start(peer)
        for peer in [p for p, batch in batches.items() if batch]:
            await start(peer)
        await asyncio.gather(*list(sends))
        if one_by_one:

            async def one(record: Primary) -> None:
                if primaries.get(record.sid) is record:
                    with contextlib.suppress(ReplicationError):
                        await self.replicate_now(record)

            await for_each(one_by_one, one, at_once=64)

    async def _send_batch(self, peer: str, items: list[tuple[Primary, dict[str, Any]]],
                          one_by_one: list[Primary]) -> None:
        ctx = self.ctx
        store = ctx.store
        link = ctx.membership.links.get(peer)
        try:
            if link is None:
                raise PeerUnavailable("no link", peer=peer)
            reply = await link.call({"op": "replicate_batch", "items": [m for _, m in items]},
                                    timeout=ctx.timeout)
        except (PeerUnavailable, PeerTimeout) as exc:
            ctx.stats["replication_failures"] += 1
            ctx.peer_error(peer, exc)
            reply = {}
        replies = reply.get("replies")
        if not isinstance(replies, list) or len(replies) != len(items):
            replies = [{"ok": False}] * len(items)  # (lost, or a peer without batches)
        for (record, msg), answer in zip(items, replies, strict=True):
            if store.primaries.get(record.sid) is not record:
                continue  # ended, or moved, while the batch was out
            if answer is None or answer.get("ok"):
                record.acked_version = max(record.acked_version, int(msg["v"]))
                ctx.stats["replicated"] += 1
                self._release_stale(record)
            elif answer.get("moved"):
                store.remove(record.sid)
                ctx.stats["moved"] += 1
                log.warning("session_moved", sid=short(record.sid), to=answer["moved"])
            else:  # need_full, refused, lost: the one-by-one way says what to do
                record.sent_version = -1
                one_by_one.append(record)

    def _others_in_view(self) -> bool:
        """Is another member of the view one that could hold a copy? (A witness votes and
        holds none: with only witnesses besides us we are a one-server cluster.)"""
        membership = self.ctx.membership
        return sum(not membership.server(m).witness
                   for m in membership.quorum.view.members) > 1

    async def await_removal(self, record: Primary, peer: str) -> None:
        """The secondary cannot be reached. While the view lists it, no other server may
        take its place (rule R, docs/consistency.md): it may be alive behind a partition and
        promote its copy once the majority ends us — a copy without what another secondary
        acknowledged. So wait (bounded) for the view to remove it; 503 otherwise."""
        ctx = self.ctx
        membership = ctx.membership
        c = ctx.config.cluster
        timeout = c.heartbeat_interval_s * (2 * c.missed_heartbeats + 1)
        if not await membership.wait_view(
                lambda: membership.in_view(peer) and not membership.is_alive(peer), timeout,
                redial=[peer]):
            raise NotServing(f"secondary {peer} unreachable and still in the view",
                             peer=peer, state="unprotected")
        if ctx.store.primaries.get(record.sid) is not record:
            raise SessionMoved("session fenced or moved while its secondary was repaired",
                               peer=ctx.me.id)

    @staticmethod
    def _replicate_msg(record: Primary) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": "replicate", "sid": record.sid, "v": record.version,
                               "e": record.epoch, "max_inactive_s": record.max_inactive_s,
                               "created": record.created, "last_access": record.last_access}
        if record.last_rid is not None:  # (absent: none, as a replica reads it)
            msg["rid"] = record.last_rid
            msg["undo"] = record.undo
        if record.sent_version < 0:
            msg["data"] = record.data
        else:
            data = record.data
            msg["base"] = record.sent_version
            pending = record.pending  # (in the data's order: a replica iterates as we do)
            msg["set"] = {k: v for k, v in data.items() if k in pending}
            msg["del"] = [k for k in record.pending if k not in data]
        record.sent_version = record.version
        record.clear_pending()
        return msg

    @staticmethod
    def _stub_msg(record: Primary) -> dict[str, Any]:
        """Offload: the store holds this version; the secondary keeps a stub of it (and the
        last request's id and the values it replaced, for exactly-once retries)."""
        msg: dict[str, Any] = {"op": "replicate", "sid": record.sid, "v": record.version,
                               "e": record.epoch, "rid": record.last_rid, "undo": record.undo,
                               "max_inactive_s": record.max_inactive_s,
                               "created": record.created, "last_access": record.last_access,
                               "stub": True}
        record.sent_version = record.version
        record.clear_pending()
        return msg

    def _release_stale(self, record: Primary) -> None:
        if record.stale_holders:
            for peer in record.stale_holders - {record.secondary}:
                self.ctx.send(peer, {"op": "release", "sid": record.sid})
            record.stale_holders = ()

    def planned_secondary(self, record: Primary,
                          peers: list[ServerConfig] | None = None) -> str | None:
        """The secondary a token handed out now must name (in a link the app renders before
        its commit): the current one while it is alive, else the one the next commit will
        replicate to, chosen now — not NONE just because a re-protection is under way.
        `peers`: the live peers, when the caller has them already."""
        ctx = self.ctx
        peer = record.secondary
        if ctx.mode == "none" or (peer is not None and (
                ctx.membership.is_alive(peer) or ctx.membership.in_view(peer))):
            return peer  # (unreachable but in the view: only the view may replace it)
        if ctx.membership.recently_stalled():
            # No new secondary right after our own stall: it would hold no copy, and its
            # ack would say nothing of whether the session lives on elsewhere since.
            return peer
        peer = ctx.choose_secondary(peers=peers)
        if peer is not None:
            ctx.store.assign_secondary(record, peer)
        return peer

    # --- async mode: batches ------------------------------------------------------------

    async def flush_async(self) -> None:
        sids, self._async_dirty = list(self._async_dirty), {}
        primaries = self.ctx.store.primaries
        records = [r for sid in sids if (r := primaries.get(sid)) is not None]
        await asyncio.gather(*(self.replicate_now(r) for r in records), return_exceptions=True)

    async def async_loop(self) -> None:
        interval = self.ctx.config.session.async_flush_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), interval)
            self._flush_now.clear()
            if self._async_dirty:
                await self.flush_async()
