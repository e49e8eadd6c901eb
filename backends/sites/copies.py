"""The remote side: the copies this server keeps of another site's sessions.

A copy is the session's full state as its primary at the remote site sent it, kept apart
from the local replicas: the local failover never promotes it (only the site-down rule of
takeover.py does). A copy never goes back to an older (epoch, version); an invalidated
session leaves a tombstone, so that a late copy of it cannot bring it back. A session this
site took over (here or at a peer, which says so with `site_drop`) leaves a marker too: a
copy of it from its old site is answered `moved` by every server here, whichever the old
primary sends it to. WAN copies are written to this site's store before they are
acknowledged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from tandem.logs import short

from ..persistence.base import StoredSession
from ..persistence.errors import StoreError
from ..sessions.context import Context, age

__all__ = ["RemoteCopies"]

log = structlog.get_logger("tandem.sites")

State = dict[str, Any]


class RemoteCopies:
    """Copies of remote sessions held by this server (memory, and the store for WAN)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.copies: dict[str, State] = {}   # sid -> state, with "primary": its remote server
        self.ended: dict[str, float] = {}    # invalidated sids -> when (time.time())
        # sessions this site took over: sid -> (their old site, the epoch here, when)
        self.moved: dict[str, tuple[str, int, float]] = {}

    def get(self, sid: str) -> State | None:
        return self.copies.get(sid)

    def drop(self, sid: str, *, site: str | None = None, epoch: int = 0) -> None:
        """Our copy is not needed any more: `site`'s session was taken over here (at epoch
        `epoch`) — remembered, so that its old primary is told so."""
        self.copies.pop(sid, None)
        if site is not None:
            self.moved[sid] = (site, epoch, time.time())

    def _taken(self, sid: str, epoch: int) -> bool:
        """Taken over here after this copy was made? (A copy of a later epoch is a later
        take-over by its site, of a session that was ours: the marker is stale.)"""
        marker = self.moved.get(sid)
        if marker is None:
            return False
        if epoch < marker[1]:
            return True
        del self.moved[sid]
        return False

    def moved_from(self, site: str) -> dict[str, int]:
        """The sessions of `site` this site took over, with their epochs here."""
        return {sid: epoch for sid, (s, epoch, _) in self.moved.items() if s == site}

    async def accept(self, peer: str, items: list[State], *, persist: bool) -> dict[str, Any]:
        """Copies from `peer`'s primaries, in full or as deltas; `moved`: sessions this site
        took over since (the sender must let go of them); `need_full`: deltas whose base
        is not held here; WAN (`persist`): acknowledged once in the store."""
        ctx = self.ctx
        moved: list[str] = []
        need_full: list[str] = []
        rows: list[State] = []
        for state in items:
            sid = state["sid"]
            if sid in self.ended:
                continue  # invalidated: a late copy must not bring it back
            if sid in ctx.store.primaries or self._taken(sid, int(state.get("e", 0))):
                moved.append(sid)  # we took it over (its site was down)
                continue
            held = self.copies.get(sid)
            if held is not None and age(held) > age(state):
                continue  # never back to an older copy
            if "data" not in state:  # a delta on the version `base` of the same epoch
                if held is None or (int(held["e"]), int(held["v"])) != (
                        int(state["e"]), int(state["base"])):
                    need_full.append(sid)
                    continue
                data = held["data"]
                data.update(state.pop("set"))
                for key in state.pop("del"):
                    data.pop(key, None)
                del state["base"]
                state["data"] = data
            state["primary"] = peer
            self.copies[sid] = state
            rows.append(state)
        if persist and rows and ctx.persister is not None:
            store = ctx.persister.store
            try:
                async with asyncio.timeout(ctx.config.persistence.timeout_s):
                    await store.save([StoredSession.of(s) for s in rows])
            except (StoreError, TimeoutError) as exc:
                log.error("site_copy_store_failed", store=store.kind, error=str(exc),
                          sessions=len(rows))
                return {"ok": False, "error": "store"}  # the sender keeps them queued
            ctx.stats["site_copies_stored"] = ctx.stats.get("site_copies_stored", 0) + len(rows)
        ctx.stats["site_copies_received"] = (ctx.stats.get("site_copies_received", 0)
                                             + len(rows))
        return {"ok": True, "moved": moved, "need_full": need_full}

    async def invalidate(self, sids: list[str]) -> dict[str, Any]:
        """The remote primary ended these sessions: no copy of them may be promoted here."""
        now = time.time()
        for sid in sids:
            self.copies.pop(sid, None)
            self.ended[sid] = now
        persister = self.ctx.persister
        if persister is not None and sids:
            try:
                async with asyncio.timeout(self.ctx.config.persistence.timeout_s):
                    await persister.store.delete(sids)
            except (StoreError, TimeoutError) as exc:
                log.error("site_copy_store_failed", store=persister.store.kind,
                          error=str(exc), sessions=len(sids))
                return {"ok": False, "error": "store"}
        for sid in sids:
            log.info("site_copy_invalidated", sid=short(sid))
        return {"ok": True}

    def touch(self, items: dict[str, float]) -> None:
        for sid, last_access in items.items():
            held = self.copies.get(sid)
            if held is not None:
                held["last_access"] = max(float(held["last_access"]), float(last_access))

    def sweep(self) -> None:
        """Copies past their inactivity limit, and tombstones older than the longest one."""
        now = time.time()
        dead = [sid for sid, s in self.copies.items()
                if now - float(s["last_access"]) > float(s["max_inactive_s"])]
        for sid in dead:
            del self.copies[sid]
        keep_s = 2 * self.ctx.config.session.max_inactive_s
        for sid in [sid for sid, at in self.ended.items() if now - at > keep_s]:
            del self.ended[sid]
        for sid in [sid for sid, (_, _, at) in self.moved.items() if now - at > keep_s]:
            del self.moved[sid]
