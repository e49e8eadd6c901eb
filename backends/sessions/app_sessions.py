"""Application sessions on a server: where each lives, and reading and writing it there.

An application session (a room, a shared cart, a call) is stored as one more record of the
`LocalStore`, under an id derived from its key (`app_id`): it is replicated to a secondary
chosen by rank, promoted when its primary dies, handed over at a drain, expired and
persisted exactly as a session is. Its members are kept in it (`RESERVED` keys), so a
persistent store holds the room together with the sessions that belong to it.

Where it lives: it is created at its key's home — the first non-witness member of the view
in rendezvous order of the key, which every server computes alike while the view is the
same — and stays where it is until a failure or a drain moves it to its secondary. A
request on any other server reads and writes it there over the replication channel
(`app_open`, `app_commit`); each server remembers where it found it, and when that is
wrong asks its peers (`app_where`). It is never moved to the servers that use it: the
members of one room on three servers would make it bounce.

A commit is applied at the primary key by key (last writer wins per key; `incr` and
`append` on the current value), replicated as a session's commit is (sync: acknowledged by
the secondary), and answered with the new state; a retry of it (same id: the proxy's
request id, or the one it was first sent with) is applied once (docs/app-sessions.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from typing import Any

import structlog

from ..errors import NotServing, PeerTimeout, PeerUnavailable, ReplicationError
from .app_session import RESERVED, AppSession, applied
from .committing import Committer
from .context import Context
from .expiry import Expiry
from .store import APP_PREFIX, Primary

__all__ = ["AppSessions", "app_id"]

log = structlog.get_logger("tandem.sessions")

_MEMBER = RESERVED + "m:"  # RESERVED + "m:" + member id -> {"t": last seen, "ops": [...]}
_OPS_KEPT = 16             # commit ids a member's entry remembers (retries applied once)
_WHERE_KEPT = 100_000      # application sessions whose primary a server remembers
# "not primary here" (never an empty reply: the channel answers that as {"ok": True})
_ABSENT: dict[str, Any] = {"ok": False, "absent": True}


def app_id(key: str) -> str:
    """The record id of the application session named `key` (never a session's id: those
    have no dot)."""
    return APP_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:40]


class AppSessions:
    """The application sessions of one server, and the way to the others'."""

    def __init__(self, ctx: Context, committer: Committer, expiry: Expiry) -> None:
        self.ctx = ctx
        self.committer = committer
        self.expiry = expiry
        self.loop: asyncio.AbstractEventLoop | None = None   # set by start()
        self.where: dict[str, str] = {}                      # app id -> its primary, last seen
        self._creating: dict[str, asyncio.Future[Primary]] = {}
        c = ctx.config.cluster
        # how long a request looks for one: a replication timeout, then the time for the
        # view to remove a dead primary (suspicion, a lease, a ballot) and a retry
        self.budget_s = 2 * ctx.timeout + c.heartbeat_interval_s * (2 * c.missed_heartbeats + 3)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()

    # --- the requesting side ------------------------------------------------------------

    async def open(self, key: str, *, member: str) -> dict[str, Any]:
        """Its state, read at its primary (created empty there if it does not exist)."""
        return await self._call(key, {"op": "app_open", "member": member})

    async def commit(self, handles: list[AppSession], *, rid: str | None) -> None:
        """Commit a request's writes to its application sessions, each at its primary."""
        async def one(handle: AppSession) -> None:
            changes = handle.collect()
            if not changes:
                return
            # a retry of the request (the proxy's id) makes the same commits: applied once
            # (numbered: a request may commit again, after its response head)
            seed = (f"{rid}|{handle.key}|{handle.member}|{handle.commits}" if rid
                    else uuid.uuid4().hex)
            handle.commits += 1
            op = hashlib.sha256(seed.encode()).hexdigest()[:16]
            state = await self._call(handle.key, {"op": "app_commit", "member": handle.member,
                                                  "commit": op, **changes.message()})
            handle.committed(state)

        await asyncio.gather(*(one(h) for h in handles))

    async def _call(self, key: str, msg: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        aid = msg["aid"] = app_id(key)
        deadline = time.monotonic() + self.budget_s
        while True:
            target = self.where.get(aid)
            create = False
            if target is None:
                target, create = await self._locate(aid)
            reply: dict[str, Any] = {}
            if target is not None:
                msg["create"] = create
                if target == ctx.me.id:
                    reply = await self._answer(dict(msg))
                else:
                    link = ctx.membership.links.get(target)
                    try:
                        if link is None:
                            raise PeerUnavailable("not a peer", peer=target)
                        reply = await link.call(dict(msg), timeout=ctx.timeout)
                    except (PeerUnavailable, PeerTimeout) as exc:
                        ctx.peer_error(target, exc)
                        self.where.pop(aid, None)
                        await self._await_gone([target], deadline)
            if reply.get("ok"):
                if len(self.where) >= _WHERE_KEPT:
                    self.where.clear()  # (rooms that expired: found again when next used)
                self.where[aid] = reply["primary"]
                return reply
            self.where.pop(aid, None)
            at = reply.get("at")
            if isinstance(at, str) and at != target and ctx.membership.is_alive(at):
                self.where[aid] = at  # its replica names the primary: go there at once
                continue
            if time.monotonic() >= deadline:
                if time.monotonic() >= ctx.membership.ack_until:
                    await ctx.membership.ready()  # our own lease: why we cannot serve
                # (a 503 about this request's data, not this server: the proxy keeps it)
                raise NotServing(f"application session {aid[:12]} not reachable"
                                 f" ({reply.get('error', 'no primary found')})",
                                 peer=ctx.me.id, state="owner-unreachable")
            await asyncio.sleep(0.02)  # (a hand-over or a promotion under way)

    async def _locate(self, aid: str) -> tuple[str | None, bool]:
        """Where it lives: (server, False); (home, True) when no server holds it, so the
        home creates it (or loads it from the store); (None, False) to look again."""
        ctx = self.ctx
        membership = ctx.membership
        if aid in ctx.store.primaries:
            return ctx.me.id, False
        peers = [link.peer.id for link in membership.links.values()
                 if link.alive and not link.peer.witness]
        replies = await asyncio.gather(*(membership.links[p].call(
            {"op": "app_where", "aid": aid}, timeout=ctx.timeout) for p in peers),
            return_exceptions=True)
        owners: set[str] = set()     # the primaries its copies name
        holders: list[str] = []      # the servers holding a copy
        silent: list[str] = []
        local = ctx.store.replicas.get(aid)
        if local is not None:
            owners.add(local.primary)
            holders.append(ctx.me.id)
        best: tuple[int, str] | None = None
        for peer, reply in zip(peers, replies, strict=True):
            if isinstance(reply, BaseException):
                silent.append(peer)
            elif reply.get("primary"):
                if best is None or int(reply.get("e", 0)) > best[0]:
                    best = (int(reply.get("e", 0)), peer)
            elif isinstance(reply.get("replica_of"), str):
                owners.add(reply["replica_of"])
                holders.append(peer)
        if best is not None:
            return best[1], False
        if owners and not silent and owners <= set(peers):
            # Every primary its copies name is alive and said it holds nothing (it expired
            # there, say, and the copy missed the news): the copy is the best there is, and
            # its holder promotes it (or drops it, expired).
            return holders[0], True
        if owners or silent:
            # A copy names a primary that is unreachable (dead, or being removed), or a
            # server did not answer: wait for the view rather than create a second one.
            await self._await_gone([*owners, *silent], time.monotonic() + ctx.timeout)
            return None, False
        return self.home(aid), True

    def home(self, aid: str) -> str:
        """The server where it is created: rendezvous order of the key over the view."""
        membership = self.ctx.membership
        members = [m for m in membership.quorum.view.members
                   if not membership.server(m).witness] or [self.ctx.me.id]
        return max(members, key=lambda m: hashlib.sha256(f"{aid}|{m}".encode()).digest())

    async def _await_gone(self, servers: list[str], deadline: float) -> None:
        """Wait (bounded) until none of `servers` is an unreachable member of the view."""
        membership = self.ctx.membership
        if not membership.quorum.view.members:
            return
        await membership.wait_view(
            lambda: any(membership.in_view(p) and not membership.is_alive(p)
                        for p in servers if p != self.ctx.me.id),
            max(0.0, deadline - time.monotonic()), redial=servers)

    # --- the primary's side -------------------------------------------------------------

    def handle(self, peer: str, msg: dict[str, Any]) -> Any:
        """The peers' `app_*` messages."""
        op = msg.get("op")
        aid = msg.get("aid")
        if not isinstance(aid, str):
            return {"ok": False, "error": "no application session id"}
        if op == "app_where":
            record = self.ctx.store.primaries.get(aid)
            if record is not None:
                return {"primary": True, "e": record.epoch}
            replica = self.ctx.store.replicas.get(aid)
            return {"replica_of": replica.primary} if replica is not None else {"none": True}
        if op in ("app_open", "app_commit"):
            return self._answer(msg)
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.apply(msg)
        except ReplicationError as exc:  # (NotServing, SessionMoved: the requester retries)
            return {"ok": False, "error": str(exc), "state": getattr(exc, "state", "moved")}

    async def apply(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Read (`app_open`) or write (`app_commit`) it here; `{"at": P}` or `_ABSENT` when
        it is not primary here."""
        ctx = self.ctx
        if time.monotonic() >= ctx.membership.ack_until:
            await ctx.membership.ready()  # no lease: the majority may have moved it on
        aid = msg["aid"]
        record = ctx.store.primaries.get(aid)
        if record is not None and record.expired(time.time()):
            self.expiry.expire([record])
            record = None
        if record is None:
            replica = ctx.store.replicas.get(aid)
            if replica is not None and not msg.get("create"):
                return {"at": replica.primary}
            if replica is None and (not msg.get("create") or self.home(aid) != ctx.me.id):
                return _ABSENT
            record = await self._create(aid)  # (create: no primary anywhere, said _locate)
        first_version = record.version
        repeated = self._write(record, msg)
        await self._acknowledge(record, changed=repeated or record.version != first_version,
                                repeated=repeated)
        if ctx.store.primaries.get(aid) is not record:
            return _ABSENT  # moved, fenced or expired meanwhile: the requester looks again
        return self._state(record)

    def _write(self, record: Primary, msg: dict[str, Any]) -> bool:
        """Apply a commit's writes (or a read's join and touch) to the record, at once: no
        other commit comes between reading its values and writing them. True when the
        commit was applied before (a retry of it)."""
        now = time.time()
        member = str(msg["member"])
        mkey = _MEMBER + member
        entry = _entry(record.data.get(mkey))
        set_: dict[str, str] = {}
        deleted: set[str] = set()
        commit = msg["op"] == "app_commit"
        if commit and msg["commit"] in entry["ops"]:
            if self.ctx.debug:
                log.debug("app_commit_repeated", app=record.sid[:12], member=member,
                          commit=msg["commit"])
            return True
        if commit:
            set_, deleted, conflicts = applied(record.data, msg)
            for key, error in conflicts:
                log.error("app_session_conflict", app=record.sid[:12], key=key, error=error)
            entry["ops"] = [*entry["ops"], msg["commit"]][-_OPS_KEPT:]
        if commit or mkey not in record.data or now - entry["t"] > record.max_inactive_s / 4:
            entry["t"] = now  # joined, or seen again (members touch it: expiry)
            set_[mkey] = json.dumps(entry, separators=(",", ":"))
            deleted |= self._gone_members(record, now, keep=mkey)
        if set_ or deleted:
            record.apply(set_, deleted)
        record.last_access = now
        if record.version == 0:
            record.version = 1
        if self.ctx.debug and commit:
            log.debug("app_committed", app=record.sid[:12], member=member,
                      commit=msg["commit"], version=record.version)
        return False

    async def _acknowledge(self, record: Primary, *, changed: bool, repeated: bool) -> None:
        """Bring the record to its secondary and the store, as a session's commit does,
        before the answer: acknowledged only what two copies hold (sync), under the lease."""
        ctx = self.ctx
        if ctx.mode != "none":
            if record.version != record.sent_version or record.secondary is None:
                await self.committer.replicate(record)
            elif repeated and ctx.mode == "sync" and record.acked_version < record.version:
                # the first attempt's copy may never have been acknowledged (its
                # replication failed): this answer must not say it was
                await self.committer.replicate_now(record)
            elif record.secondary is not None:
                ctx.touched.setdefault(record.secondary, {})[record.sid] = record.last_access
        if ctx.persister is not None:
            await ctx.persister.committed(record, changed=changed)
        if time.monotonic() >= ctx.membership.ack_until:
            await ctx.membership.ready()

    @staticmethod
    def _gone_members(record: Primary, now: float, *, keep: str) -> set[str]:
        """The members not seen for `max_inactive_s`: they refer to it no more."""
        return {k for k, v in record.data.items() if k.startswith(_MEMBER) and k != keep
                and now - _entry(v)["t"] > record.max_inactive_s}

    async def _create(self, aid: str) -> Primary:
        """It has no primary anywhere: the copy held here promoted, else loaded from the
        persistent store, else new."""
        pending = self._creating.get(aid)
        if pending is not None:
            return await asyncio.shield(pending)
        ctx = self.ctx
        fut: asyncio.Future[Primary] = asyncio.get_running_loop().create_future()
        self._creating[aid] = fut
        try:
            replica = ctx.store.replicas.get(aid)
            if replica is not None and time.time() - replica.last_access > replica.max_inactive_s:
                del ctx.store.replicas[aid]  # expired with its primary's: starts anew
                replica = None
            state = None
            if replica is None and ctx.persister is not None:
                state = await ctx.persister.load(aid)
            record = ctx.store.primaries.get(aid)
            replica = ctx.store.replicas.get(aid)
            if record is None and replica is not None:
                record = ctx.store.promote(replica, epoch=ctx.next_epoch(replica.epoch))
                log.info("app_session_promoted", app=aid[:12], version=record.version,
                         old_primary=replica.primary)
            elif record is None and state is not None:
                record = Primary(aid, data=state["data"], version=int(state["v"]),
                                 epoch=ctx.next_epoch(int(state.get("e", 0))),
                                 max_inactive_s=float(state["max_inactive_s"]),
                                 created=float(state["created"]),
                                 last_access=float(state["last_access"]))
                ctx.store.primaries[aid] = record
                log.info("app_session_loaded", app=aid[:12], version=record.version,
                         members=sum(k.startswith(_MEMBER) for k in record.data))
            elif record is None:
                record = Primary(aid, max_inactive_s=ctx.store.max_inactive_s)
                ctx.store.replicas.pop(aid, None)
                ctx.store.primaries[aid] = record
                log.info("app_session_created", app=aid[:12])
            if ctx.mode != "none" and record.secondary is None:
                ctx.store.assign_secondary(record, ctx.choose_secondary())
            fut.set_result(record)
            return record
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            del self._creating[aid]

    def _state(self, record: Primary) -> dict[str, Any]:
        data = {k: v for k, v in record.data.items() if not k.startswith(RESERVED)}
        members = sorted(k[len(_MEMBER):] for k in record.data if k.startswith(_MEMBER))
        return {"ok": True, "v": record.version, "data": data, "members": members,
                "primary": self.ctx.me.id, "secondary": record.secondary}


def _entry(serialized: str | None) -> dict[str, Any]:
    if serialized is None:
        return {"t": 0.0, "ops": []}
    entry: dict[str, Any] = json.loads(serialized)
    return entry
