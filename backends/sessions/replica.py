"""The replica side of replication: what a server does with its peers' messages.

Replicate (full state or a delta on top of the version it holds; never back to an older
version or epoch), fetch (hand a session to a server taking it over), release, invalidate,
touch, supersede (a peer took sessions over while we were unreachable) and load reports.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import structlog

from tandem.logs import short

from ..errors import NotServing
from .context import Context
from .handover import Handover
from .store import Primary, Replica

__all__ = ["ReplicaSide"]

log = structlog.get_logger("tandem.sessions")


class ReplicaSide:
    """Answers the replication channel's messages."""

    def __init__(self, ctx: Context, handover: Handover) -> None:
        self.ctx = ctx
        self.handover = handover

    # --- replica side: messages from peers ----------------------------------------------

    def handle(self, peer: str, msg: dict[str, Any]) -> Any:
        if self.ctx.promotion.active:  # as if every ended primary's replica were promoted
            self.ctx.promotion.claim_message(msg)
        op = msg.get("op")
        if op == "ping":
            return {"op": "pong"}
        if op == "takeover":
            return self.handover.on_takeover(peer, msg)
        if op == "draining":
            return None
        if op == "load":
            self.ctx.loads[peer] = int(msg["n"])
            return None
        if op == "supersede":
            self._on_supersede(peer, msg["sids"])
            return None
        if op == "replicate":
            return self._on_replicate(peer, msg)
        if op == "replicate_batch":  # re-protection: full copies, many per frame
            ok = {"ok": True}
            replies = [self._on_replicate(peer, item) for item in msg["items"]]
            return {"replies": [None if r == ok else r for r in replies]}
        if type(op) is str and op.startswith("site_") and self.ctx.sites is not None:
            return self.ctx.sites.handle_local(peer, msg)  # remote copies (backends/sites)
        if type(op) is str and op.startswith("app_") and self.ctx.apps is not None:
            return self.ctx.apps.handle(peer, msg)  # application sessions (app_sessions.py)
        if op == "fetch":
            return self._on_fetch(peer, msg["sid"])
        budget = self.ctx.budget
        if op == "release":
            replica = self.ctx.store.replicas.get(msg["sid"])
            if replica is not None and replica.primary == peer:
                del self.ctx.store.replicas[msg["sid"]]
            if budget is not None:
                budget.drop(msg["sid"], peer=peer)
            return None
        if op == "invalidate":
            stored: list[str] = []  # evicted here: written to the store by us, maybe late
            for sid in msg["sids"]:
                replica = self.ctx.store.replicas.get(sid)
                if replica is not None and replica.primary == peer:
                    del self.ctx.store.replicas[sid]
                if budget is not None and budget.ended(sid, budget.drop(sid, peer=peer)):
                    stored.append(sid)
            return self._delete_stored(stored) if stored else {"ok": True}
        if op == "touch":
            now = time.monotonic()
            for sid, last_access in msg["items"].items():
                replica = self.ctx.store.replicas.get(sid)
                if replica is not None and replica.primary == peer:
                    replica.last_access = max(replica.last_access, last_access)
                    replica.last_heard = now
                elif budget is not None:
                    budget.touched(sid, peer, last_access)
            return None
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _on_replicate(self, peer: str, msg: dict[str, Any]) -> dict[str, Any]:
        if not self.ctx.membership.voter:
            # Not bound in the view (fenced, or restarted and not yet admitted): a copy held
            # here would be dropped at our fencing, so it must not count as one.
            return {"ok": False, "error": "not a member of the view"}
        sid = msg["sid"]
        version, epoch = int(msg["v"]), int(msg.get("e", 0))
        mine = self.ctx.store.primaries.get(sid)
        if mine is not None:
            if mine.epoch >= epoch:
                # We took this session over (the sender was thought failed): ours wins.
                return {"ok": False, "moved": self.ctx.me.id}
            self._drop_superseded(mine, by=peer)  # we were the stale one
        replica = self.ctx.store.replicas.get(sid)
        if replica is not None and epoch < replica.epoch:
            return {"ok": False, "moved": replica.primary}  # a newer primary exists
        budget = self.ctx.budget
        if budget is not None and sid in budget.stubs:
            stub = budget.stubs[sid]
            if epoch < stub.epoch:
                return {"ok": False, "moved": stub.peer or self.ctx.me.id}
            if "data" in msg or msg.get("stub"):
                budget.drop(sid)  # replaced by what this message brings
        if msg.get("stub"):  # offload: the store holds this version (sessions/budget.py)
            if budget is None:
                return {"ok": False, "error": "a stub, but no store here"}
            if replica is not None and epoch == replica.epoch and replica.version > version:
                return {"ok": True, "stale": True}
            budget.stub_replica(peer, msg)
            return {"ok": True}
        if "data" in msg and replica is None and budget is not None and budget.full(version):
            # Past the budget with nowhere to evict to: no copy of a new session (the primary
            # answers its request 503 memory-budget), as no new session of our own.
            return {"ok": False, "error": "memory budget reached", "state": "memory-budget"}
        if "data" in msg:
            if replica is not None and epoch == replica.epoch and replica.version > version:
                return {"ok": True, "stale": True}  # never go back to an older version
            store = self.ctx.store
            replica = Replica(sid, data=store.interned(msg["data"]), version=version,
                              epoch=epoch,
                              max_inactive_s=store.inactive(float(msg["max_inactive_s"])),
                              created=float(msg["created"]),
                              last_access=float(msg["last_access"]), primary=peer,
                              last_rid=msg.get("rid"), undo=msg.get("undo"))
            store.replicas[sid] = replica
            return {"ok": True}
        if replica is None or replica.version != msg["base"]:
            if replica is not None and epoch == replica.epoch and replica.version >= version:
                return {"ok": True, "stale": True}
            return {"ok": False, "need_full": True}
        replica.data.update(msg["set"])
        for key in msg["del"]:
            replica.data.pop(key, None)
        replica.version = version
        replica.epoch = epoch
        replica.primary = peer
        replica.last_rid, replica.undo = msg.get("rid"), msg.get("undo")
        replica.max_inactive_s = self.ctx.store.inactive(float(msg["max_inactive_s"]))
        replica.last_access = float(msg["last_access"])
        replica.last_heard = time.monotonic()
        if budget is not None:
            budget.replicated(replica)
        return {"ok": True}

    async def _delete_stored(self, sids: list[str]) -> dict[str, Any]:
        """Invalidated sessions whose copy we evicted: gone from the store before the ack."""
        persister = self.ctx.persister
        if persister is not None:
            for sid in sids:
                await persister.invalidated(sid)
        return {"ok": True}

    def _on_supersede(self, peer: str, sids: dict[str, int]) -> None:
        """`peer` took these sessions over while we were unreachable: let go of ours."""
        for sid, epoch in sids.items():
            mine = self.ctx.store.primaries.get(sid)
            if mine is not None and mine.epoch < epoch:
                self._drop_superseded(mine, by=peer)
            replica = self.ctx.store.replicas.get(sid)
            if replica is not None and replica.epoch < epoch:
                del self.ctx.store.replicas[sid]
            if self.ctx.budget is not None:
                self.ctx.budget.drop(sid, older_than=epoch)

    def _drop_superseded(self, record: Primary, *, by: str) -> None:
        self.ctx.store.remove(record.sid)
        record.superseded = True
        self.ctx.stats["superseded"] += 1
        log.warning("session_superseded", sid=short(record.sid), by=by, epoch=record.epoch)

    async def _handed_over(self, reply: dict[str, Any], sid: str,
                           holder: str) -> dict[str, Any]:
        """Our secondary lets go of its copy before the new primary gets the session: a copy
        naming us as primary would be promoted when the view ends us, in place of the newer
        one the new primary acknowledges from now on. (If it cannot be told, the new primary
        releases it once its own secondary has the state.)"""
        await self.ctx.call_quietly(holder, {"op": "release", "sid": sid})
        return reply

    async def _fetch_stub(self, peer: str, sid: str) -> Any:
        """A fetch of a session evicted here: loaded back, then handed over as any other."""
        assert self.ctx.budget is not None
        try:
            record = await self.ctx.budget.reinstate(sid)
        except NotServing as exc:
            return {"found": False, "error": str(exc)}
        if record is None:
            return {"found": False}
        reply = self._on_fetch(peer, sid)
        return await reply if inspect.isawaitable(reply) else reply

    def _on_fetch(self, peer: str, sid: str) -> Any:
        record = self.ctx.store.primaries.get(sid)
        budget = self.ctx.budget
        if record is None and budget is not None and sid in budget.stubs and (
                budget.stubs[sid].primary):
            return self._fetch_stub(peer, sid)
        if record is not None:
            state = record.state()
            self.ctx.store.demote(record, new_primary=peer)  # kept until the new secondary has it
            log.info("session_handed_over", sid=short(sid), to=peer, version=record.version)
            reply = {"found": True, "kind": "primary", "secondary": record.secondary, **state}
            holder = record.secondary
            if holder is None or holder == peer:
                return reply
            return self._handed_over(reply, sid, holder)

        replica = self.ctx.store.replicas.get(sid)
        if replica is not None:
            primary, replica.primary = replica.primary, peer
            replica.last_heard = time.monotonic()
            return {"found": True, "kind": "replica", "primary": primary,
                    "sid": sid, "v": replica.version,
                    "e": replica.epoch, "data": replica.data, "rid": replica.last_rid,
                    "undo": replica.undo,
                    "max_inactive_s": replica.max_inactive_s, "created": replica.created,
                    "last_access": replica.last_access}
        return {"found": False}
