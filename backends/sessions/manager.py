"""Where sessions live and how they move: the per-request logic of a backend server.

A request carrying token (SID, P, S) at server X (DESIGN.md §3):
- X holds the primary: use it.
- X holds the replica and P is failed: promote it (same version), pick a new secondary.
- otherwise fetch the session from P, then S (the holder keeps a demoted copy until the new
  secondary has the state, then is told to release it); X becomes primary.
- found nowhere: a new session, and `session_lost` is logged.

Changes are committed when the handler has completed: applied to the primary and, with
`session.replication = "sync"`, acknowledged by the secondary before the response leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

import structlog

from tandem.config import Config, ServerConfig
from tandem.logs import short
from tandem.token import Route

from ..cluster.peers import Membership, PeerState
from ..cluster.ranking import choose_secondary
from ..errors import PeerTimeout, PeerUnavailable, ReplicationError, SessionMoved
from ..persistence.persister import Persister, make_persister
from .handover import HandoverMixin
from .replica import ReplicaSideMixin
from .session import Session
from .store import LocalStore, Primary, Replica

__all__ = ["SessionManager", "CommitResult", "SessionMoved"]

# After a stall of ours, no session is taken over for this long (seconds): the requests
# read then are the ones held while we were stopped, which the proxy may have moved.
HELD_REQUESTS_S = 1.0

log = structlog.get_logger("tandem.sessions")


_EPOCH_STRIDE = 1024  # epochs are unique per server: k * stride + the server's index


def _age(state: dict[str, Any]) -> tuple[int, int]:
    """How recent a copy is: (epoch, version) — a newer epoch wins over any version."""
    return int(state.get("e", 0)), int(state["v"])


@dataclass(frozen=True, slots=True)
class CommitResult:
    route: Route | None       # the token the client must hold after this response
    cleared: bool = False     # the session was invalidated: clear the client's token


class SessionManager(ReplicaSideMixin, HandoverMixin):
    """Sessions of one server: resolve tokens, commit changes, replicate, expire.

    The replica side (messages from peers) is in replica.py; hand-overs (drain, take-over,
    rebalancing) in handover.py.
    """

    def __init__(self, *, config: Config, me: str, membership: Membership) -> None:
        # configuration
        self.config = config
        self.me: ServerConfig = config.server(me)
        self._index = config.server_ids.index(me)
        self._debug = os.environ.get("TANDEM_LOG_LEVEL", "INFO").upper() == "DEBUG"
        self.mode = config.session.replication
        self._timeout = config.cluster.replication_timeout_s
        # state
        self.membership = membership
        self.store = LocalStore(max_inactive_s=config.session.max_inactive_s)
        self._opening: dict[str, asyncio.Future[Primary | None]] = {}
        self._touched: dict[str, dict[str, float]] = {}   # secondary -> sid -> last_access
        self._async_dirty: dict[str, None] = {}           # sids awaiting an async flush
        self._flush_now = asyncio.Event()
        # sessions taken over from a peer that was unreachable: peer -> sid -> our epoch
        self._superseded: dict[str, dict[str, int]] = {}
        # rebalancing: the peers' primary counts (from their load reports), and where the
        # sessions we handed on went (a stale token still finds them)
        self._rebalance = config.cluster.rebalance
        self._loads: dict[str, int] = {}
        self._moved_to: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.draining = False
        self.stats: dict[str, int] = {k: 0 for k in (
            "created", "promoted", "fetched", "lost", "replicated", "replication_failures",
            "expired", "invalidated", "moved", "handed_over", "taken_over", "superseded",
            "retries_rolled_back", "migrated")}
        # session.persistence: where sessions found nowhere in memory are loaded from
        self.persister: Persister | None = make_persister(config, stats=self.stats)
        membership.on_change(self._peer_changed)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="session-sweeper"))
        self._tasks.append(asyncio.create_task(self._touch_loop(), name="session-touch"))
        if self.mode == "async":
            self._tasks.append(asyncio.create_task(self._async_loop(), name="async-replication"))
        if self.persister is not None:
            self.persister.start()

    async def close(self) -> None:
        if self.mode == "async":
            await self._flush_async()  # what was acknowledged goes out before we stop
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.persister is not None:  # batched writes flushed, then the store closed
            await self.persister.close()

    # --- per request: resolve -----------------------------------------------------------

    def next_epoch(self, after: int) -> int:
        """An epoch newer than `after` that no other server can produce (no ties)."""
        return (after // _EPOCH_STRIDE + 1) * _EPOCH_STRIDE + self._index

    def new_session(self) -> Primary:
        record = self.store.create()
        if self.mode != "none":  # chosen now, so that links built by the handler name it
            self.store.assign_secondary(record, self._choose_secondary())
        self.stats["created"] += 1
        log.info("session_created", sid=short(record.sid))
        return record

    async def open(self, route: Route | None, *, rid: str | None = None) -> Primary | None:
        """The primary record for a request's token, taken over here if need be.

        `rid` is the proxy's id of the client request: the same on every retry. When the
        last commit came from this very request, it was applied but its response was lost
        (the server died, or the connection did): undo it, so the retry applies it once.
        """
        record = await self._open(route)
        if rid is not None and record is not None and record.last_rid == rid:
            record.roll_back()
            self.stats["retries_rolled_back"] += 1
            log.info("retry_rolled_back", sid=short(record.sid), version=record.version)
        return record

    async def _open(self, route: Route | None) -> Primary | None:
        if route is None:
            return None
        record = self.store.primaries.get(route.sid)
        if record is not None:
            if record.expired(time.time()):
                self._expire([record], [])
                return None
            return record
        pending = self._opening.get(route.sid)
        if pending is not None:  # a concurrent request is already taking it over
            return await asyncio.shield(pending)
        fut: asyncio.Future[Primary | None] = asyncio.get_running_loop().create_future()
        self._opening[route.sid] = fut
        try:
            record = await self._take_over(route)
            fut.set_result(record)
            return record
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it, nobody logs "never retrieved"
            raise
        finally:
            del self._opening[route.sid]

    async def _take_over(self, route: Route) -> Primary | None:
        sid = route.sid
        if self.membership.recently_stalled(within=HELD_REQUESTS_S):
            # We were frozen: the peers have most likely moved this session elsewhere, and
            # the request may be one the proxy gave up on while we were stopped and sent
            # to the new primary (which applied it). Taking the session over to apply it
            # again would duplicate that write; the proxy retries live requests elsewhere.
            # (Requests held in our sockets during a stall are read in its first moments.)
            raise SessionMoved("not taking sessions over right after our own stall",
                               peer=self.me.id)
        local = self.store.replicas.get(sid)
        best: dict[str, Any] | None = None
        source = "replica"
        holders: dict[str, tuple[int, int]] = {}  # server -> (epoch, version) of its copy
        answered: set[str] = set()  # servers that answered our fetch (found or not)
        if local is None or self.membership.is_alive(local.primary):
            # Ask the servers the token names and the primary our replica names; a replica
            # elsewhere names its own primary, which is asked too (the token may be stale).
            queue = [self._moved_to.get(sid), route.primary, route.secondary,
                     local.primary if local else None]
            asked: set[str] = set()
            while queue:
                peer = queue.pop(0)
                if peer is None or peer == self.me.id or peer in asked:
                    continue
                asked.add(peer)
                if not self.membership.is_alive(peer):
                    continue
                state = await self._fetch(peer, sid)
                if state is not None or self.membership.is_alive(peer):
                    answered.add(peer)
                if state is None:
                    continue
                holders[peer] = _age(state)
                authoritative = state.get("kind") == "primary"
                if best is None or _age(state) > _age(best) or (
                        authoritative and _age(state) == _age(best)):
                    best, source = state, peer
                if authoritative:
                    break
                queue.append(state.get("primary"))
        if best is None and local is None and self.persister is not None:
            best, source = await self.persister.load(sid), "store"  # found nowhere in memory
        raced = self.store.primaries.get(sid)
        if raced is not None:  # handed over to us while we asked around
            return raced
        silent = {p for p in (route.primary, local.primary if local else None)
                  if p is not None and p != self.me.id and p not in answered}
        if silent and self.membership.recently_stalled() and (best or local):
            # We were frozen: the owner we cannot reach is most likely alive and serving this
            # session; taking it over now would make two primaries. Let the proxy retry.
            raise SessionMoved("owner unreachable right after our own stall", peer=self.me.id)
        if local is not None and (best is None or (local.epoch, local.version) >= _age(best)):
            if time.time() - local.last_access > local.max_inactive_s:
                self.store.replicas.pop(sid, None)
                log.info("session_expired", sid=short(sid))
                return None
            origin = (local.epoch, local.version)
            record = self.store.promote(local, epoch=self.next_epoch(local.epoch))
            self.stats["promoted"] += 1
            log.info("promoted", sid=short(sid), version=record.version,
                     old_primary=local.primary)
        elif best is not None:
            origin = _age(best)
            self.store.replicas.pop(sid, None)
            record = Primary(sid, data=best["data"], version=int(best["v"]),
                             epoch=self.next_epoch(max(int(best.get("e", 0)),
                                                       local.epoch if local else 0)),
                             max_inactive_s=float(best["max_inactive_s"]),
                             created=float(best["created"]),
                             last_access=float(best["last_access"]),
                             last_rid=best.get("rid"), undo=best.get("undo"))
            if time.time() - record.last_access > record.max_inactive_s:
                for peer in holders:
                    self._send(peer, {"op": "invalidate", "sids": [sid]})
                log.info("session_expired", sid=short(sid))
                return None
            self.store.primaries[sid] = record
            self.stats["fetched"] += 1
            log.info("fetched", sid=short(sid), version=record.version, from_=source)
        else:
            self.stats["lost"] += 1
            log.warning("session_lost", sid=short(sid), primary=route.primary,
                        secondary=route.secondary)
            return None
        # Named owners we could not reach may only be hung: told to let go when they are back.
        for peer in silent:
            self._superseded.setdefault(peer, {})[sid] = record.epoch
        # Protect the taken-over state before the handler runs: the new secondary gets it
        # now (a holder that already has this version is kept), the other holders let go.
        if self.mode != "none":
            secondary = self._choose_secondary()
            self.store.assign_secondary(record, secondary)
            if secondary is not None and holders.get(secondary) == origin:
                # it keeps exactly this copy: the next delta (new epoch) brings it along
                record.sent_version = record.acked_version = record.version
            record.stale_holders = {p for p in holders if p != secondary}
            await self.replicate(record)
        return record

    async def _fetch(self, peer: str, sid: str) -> dict[str, Any] | None:
        try:
            reply = await self.membership.links[peer].call(
                {"op": "fetch", "sid": sid}, timeout=self._timeout)
        except (PeerUnavailable, PeerTimeout) as exc:
            self._peer_error(peer, exc)
            return None
        return reply if reply.get("found") else None

    # --- per request: commit ------------------------------------------------------------

    async def commit(self, session: Session, *, discard: bool = False,
                     rid: str | None = None, migrate: bool = False) -> CommitResult:
        """Apply the request's changes and replicate them (sync: acknowledged first)."""
        record = session.record
        if record is None:
            return CommitResult(None)
        if self.store.primaries.get(record.sid) is not record:
            # taken over by another server, invalidated or expired meanwhile
            self.stats["moved"] += 1
            raise SessionMoved("session is no longer primary here", peer=self.me.id)
        if session.invalidated:
            await self._invalidate(record)
            return CommitResult(None, cleared=True)
        first, first_version = record, record.version
        if not discard:
            changes = session.collect_changes()
            for error in changes.errors:
                log.error("session_value_unserializable", sid=short(record.sid), error=error)
            if changes.max_inactive_s is not None:
                record.max_inactive_s = changes.max_inactive_s
            if changes.set or changes.deleted:
                record.apply(changes.set, changes.deleted, rid=rid)
            if session.regenerate_requested:
                record = await self._regenerate(record)
                session._attach(record)
            session.reset()
        record.last_access = time.time()
        if record.version == 0:
            record.version = 1  # a new session is committed once, even with no keys
        if self.mode != "none":
            if record.version != record.sent_version or record.secondary is None:
                await self.replicate(record)
            elif record.secondary is not None:
                self._touched.setdefault(record.secondary, {})[record.sid] = record.last_access
        if self.persister is not None:  # after replication: a write (sync: awaited) or a touch
            await self.persister.committed(
                record, changed=record is not first or record.version != first_version)
        if migrate:
            peer = self._migration_target(record)
            if peer is not None:
                moved = await self._hand_over(record, peer, timeout=self._timeout)
                if moved is not None:
                    self.stats["migrated"] += 1
                    log.info("session_migrated", sid=short(record.sid), to=peer)
                    return CommitResult(moved)
        return CommitResult(Route(record.sid, self.me.id, record.secondary))

    async def _regenerate(self, old: Primary) -> Primary:
        record = self.store.create()
        record.data, record.version = old.data, old.version
        record.max_inactive_s, record.created = old.max_inactive_s, old.created
        await self._invalidate(old)
        log.info("session_id_regenerated", old=short(old.sid), new=short(record.sid))
        return record

    async def _invalidate(self, record: Primary) -> None:
        self.store.remove(record.sid)
        self.stats["invalidated"] += 1
        log.info("session_invalidated", sid=short(record.sid))
        if self.persister is not None:
            await self.persister.invalidated(record.sid)
        holders = {record.secondary, *record.stale_holders} - {None}
        msg = {"op": "invalidate", "sids": [record.sid]}
        if self.mode == "sync":  # a replica must not outlive an acknowledged invalidation
            await asyncio.gather(*(self._call_quietly(p, dict(msg)) for p in holders if p))
        else:
            for peer in holders:
                if peer:
                    self._send(peer, dict(msg))

    # --- replication (primary side) -----------------------------------------------------

    async def replicate(self, record: Primary) -> None:
        """Bring the secondary up to date (sync: wait for its ack; async: queue it)."""
        if self.mode == "async":
            self._async_dirty[record.sid] = None
            if len(self._async_dirty) >= self.config.session.async_flush_threshold:
                self._flush_now.set()
            if record.secondary is None or not self.membership.is_alive(record.secondary):
                self.store.assign_secondary(record, self._choose_secondary())
            return
        await self._replicate_now(record)

    async def _replicate_now(self, record: Primary) -> None:
        for _ in range(len(self.config.servers)):
            peer = self.planned_secondary(record)
            if peer is None or not self.membership.is_alive(peer):
                break  # no live peer, or none may be chosen right after our own stall
            msg = self._replicate_msg(record)
            try:
                reply = await self.membership.links[peer].call(msg, timeout=self._timeout)
            except (PeerUnavailable, PeerTimeout) as exc:
                self.stats["replication_failures"] += 1
                self._peer_error(peer, exc)
                continue
            if self.store.primaries.get(record.sid) is not record:
                if record.superseded:
                    # Another server took the session over while this write replicated
                    # (we were thought failed): it lacks the write, so it is not
                    # acknowledged; the proxy retries the request there.
                    raise SessionMoved("session taken over during replication", peer=peer)
                return  # invalidated, or fetched with this write by another server
            if reply.get("ok"):
                record.acked_version = max(record.acked_version, int(msg["v"]))
                self.stats["replicated"] += 1
                if self._debug:  # per request: not even a filtered call when not wanted
                    log.debug("replicated", sid=short(record.sid), to=peer, version=msg["v"],
                              full="data" in msg)
                self._release_stale(record)
                return
            if reply.get("need_full"):
                record.sent_version = -1
                continue
            if reply.get("moved"):
                self.store.remove(record.sid)
                self.stats["moved"] += 1
                log.warning("session_moved", sid=short(record.sid), to=reply["moved"])
                raise SessionMoved(f"session is primary at {reply['moved']}", peer=peer)
            log.error("replication_rejected", sid=short(record.sid), peer=peer,
                      reply=reply.get("error"))
            return
        if self.membership.recently_stalled():
            # Right after our own stall a secondary that does not answer has most likely
            # taken this session over: acknowledging would lose the write. The proxy fails
            # the request over instead.
            raise SessionMoved("could not replicate right after our own stall", peer=self.me.id)
        # Every attempt failed: say so in the token rather than name a secondary without it.
        self.store.assign_secondary(record, None)
        log.warning("session_unprotected", sid=short(record.sid))

    def _replicate_msg(self, record: Primary) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": "replicate", "sid": record.sid, "v": record.version,
                               "e": record.epoch, "rid": record.last_rid, "undo": record.undo,
                               "max_inactive_s": record.max_inactive_s,
                               "created": record.created, "last_access": record.last_access}
        if record.sent_version < 0:
            msg["data"] = record.data
        else:
            data = record.data
            msg["base"] = record.sent_version
            msg["set"] = {k: data[k] for k in record.pending if k in data}
            msg["del"] = [k for k in record.pending if k not in data]
        record.sent_version = record.version
        record.pending.clear()
        return msg

    def _release_stale(self, record: Primary) -> None:
        if record.stale_holders:
            for peer in record.stale_holders - {record.secondary}:
                self._send(peer, {"op": "release", "sid": record.sid})
            record.stale_holders = set()

    def planned_secondary(self, record: Primary) -> str | None:
        """The secondary a token handed out now must name (in a link the app renders before
        its commit): the current one while it is alive, else the one the next commit will
        replicate to, chosen now — not NONE just because a re-protection is under way."""
        peer = record.secondary
        if self.mode == "none" or (peer is not None and self.membership.is_alive(peer)):
            return peer
        if self.membership.recently_stalled():
            # No new secondary right after our own stall: it would hold no copy, and its
            # ack would say nothing of whether the session lives on elsewhere since.
            return peer
        peer = self._choose_secondary()
        if peer is not None:
            self.store.assign_secondary(record, peer)
        return peer

    def _choose_secondary(self) -> str | None:
        chosen = choose_secondary(self.me, self.membership.alive_peers(),
                                  self.store.replica_counts)
        return None if chosen is None else chosen.id

    async def _flush_async(self) -> None:
        sids, self._async_dirty = list(self._async_dirty), {}
        records = [r for sid in sids if (r := self.store.primaries.get(sid)) is not None]
        await asyncio.gather(*(self._replicate_now(r) for r in records), return_exceptions=True)

    async def _async_loop(self) -> None:
        interval = self.config.session.async_flush_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), interval)
            self._flush_now.clear()
            if self._async_dirty:
                await self._flush_async()

    # --- membership events --------------------------------------------------------------

    def _peer_error(self, peer: str, exc: Exception) -> None:
        link = self.membership.links.get(peer)
        if link is not None:
            link.fail(str(exc))

    async def _peer_changed(self, peer: str, state: PeerState, cause: str) -> None:
        if state is PeerState.ALIVE and peer in self._superseded:
            superseded = self._superseded.pop(peer)
            self._send(peer, {"op": "supersede", "sids": superseded})
            log.info("supersede_sent", peer=peer, sessions=len(superseded))
        if self.mode == "none" or self.draining:
            return
        if state is PeerState.ALIVE:
            orphans = list(self.store.primaries_with_secondary(None))
        else:
            orphans = list(self.store.primaries_with_secondary(peer))
            for record in orphans:
                self.store.assign_secondary(record, None)
                if state is PeerState.DRAINING:  # it still holds the copy: release it after
                    record.stale_holders.add(peer)
            if state is not PeerState.DRAINING and not self.membership.recently_stalled():
                # (after our own stall the "failed" peer is most likely alive: it was we
                # who were silent; its sessions are promoted on request if it really died)
                orphans += self._promote_orphans(peer)
        if orphans:
            await self._reprotect(orphans, cause=f"{peer} {state.value}")

    def _promote_orphans(self, peer: str) -> list[Primary]:
        """Promote the replicas whose primary just failed, so they have two copies again.

        Waiting for each session's next request (as WebLogic does) would leave it with a
        single copy for as long as its user is idle: a second failure would lose it. The
        token still names the failed primary first, so the proxy's next candidate — its
        secondary, this server — serves it, and the response carries the new token. If the
        peer was only hung, epochs keep its stale copies from being served when it resumes.
        """
        replicas = [r for r in self.store.replicas.values() if r.primary == peer]
        promoted = []
        superseded = self._superseded.setdefault(peer, {})
        for replica in replicas:
            if time.time() - replica.last_access > replica.max_inactive_s:
                del self.store.replicas[replica.sid]
                continue
            record = self.store.promote(replica, epoch=self.next_epoch(replica.epoch))
            superseded[record.sid] = record.epoch
            promoted.append(record)
        if promoted:
            self.stats["promoted"] += len(promoted)
            log.info("promoted", sessions=len(promoted), old_primary=peer,
                     cause="primary failed")
        return promoted

    async def _reprotect(self, records: list[Primary], *, cause: str) -> None:
        started = time.monotonic()
        sem = asyncio.Semaphore(64)

        async def one(record: Primary) -> None:
            async with sem:
                if self.store.primaries.get(record.sid) is record:
                    with contextlib.suppress(ReplicationError):
                        await self._replicate_now(record)

        await asyncio.gather(*(one(r) for r in records))
        log.info("reprotected", sessions=len(records), cause=cause,
                 seconds=round(time.monotonic() - started, 3))

    # --- background: touch and expiry ---------------------------------------------------

    async def _touch_loop(self) -> None:
        interval = min(self.config.cluster.heartbeat_interval_s,
                       self.config.session.max_inactive_s / 4)
        while True:
            await asyncio.sleep(interval)
            touched, self._touched = self._touched, {}
            for peer, items in touched.items():
                self._send(peer, {"op": "touch", "items": items})
            if self._rebalance:
                self.membership.broadcast({"op": "load", "n": len(self.store.primaries)})

    async def _sweep_loop(self) -> None:
        interval = max(0.1, min(30.0, self.config.session.max_inactive_s / 10))
        while True:
            await asyncio.sleep(interval)
            primaries, replicas = self.store.expired()
            if primaries or replicas:
                self._expire(primaries, replicas)

    def _expire(self, primaries: list[Primary], replicas: list[Replica]) -> None:
        by_peer: dict[str, list[str]] = {}
        for record in primaries:
            self.store.remove(record.sid)
            if record.secondary is not None:
                by_peer.setdefault(record.secondary, []).append(record.sid)
        for peer, sids in by_peer.items():
            self._send(peer, {"op": "invalidate", "sids": sids})
        self.stats["expired"] += len(primaries)
        if self.persister is not None:
            self.persister.expired([r.sid for r in primaries])
        log.info("sessions_expired", primaries=len(primaries), replicas=len(replicas))

    # --- helpers ------------------------------------------------------------------------

    def _send(self, peer: str, msg: dict[str, Any]) -> None:
        link = self.membership.links.get(peer)
        if link is not None:
            link.send(msg)

    async def _call_quietly(self, peer: str, msg: dict[str, Any]) -> None:
        link = self.membership.links.get(peer)
        if link is None:
            return
        try:
            await link.call(msg, timeout=self._timeout)
        except (PeerUnavailable, PeerTimeout) as exc:
            self._peer_error(peer, exc)
