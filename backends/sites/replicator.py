"""The sending side: this server's primaries copied to the remote sites.

Each session's copy goes to one server of each remote site, the first reachable one in the
session's rendezvous order (`tandem.sites.rank_remote`). Per site mode:

- `man` with `remote_sync`: a commit that changed the session waits for the remote ack
  (after the local secondary's). If no server of the site is reachable, or the call fails,
  the write is acknowledged with the local copies only and the session is queued: the
  remote site is *behind* (counted, logged) until the catch-up loop delivers it.
- `man` without `remote_sync`, and `wan`: queued, and sent in batches every
  `flush_interval_s` or sooner when `flush_threshold` sessions wait. WAN copies are written
  to the remote site's store before the remote acknowledges them.

A copy is sent as a delta — the keys changed since the version the holder acknowledged
(`Primary.site_pending`), on that version as base — when the same server holds the copy
of the same epoch; else in full. A holder that no longer has that base answers
`need_full` for it: sent again in full (at once for MAN's synchronous copy, in the next
batch otherwise).

Invalidations are delivered to every server of the site (whichever may hold a copy), kept
per server until it acknowledged them. Commits that changed nothing only move the remote
copy's last access (a touch, batched).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog

from tandem.logs import short
from tandem.sites import SiteConfig, rank_remote

from ..errors import PeerTimeout, PeerUnavailable, SessionMoved
from ..sessions.context import Context
from ..sessions.store import Primary
from .channel import SiteChannel

__all__ = ["SiteReplicator"]

log = structlog.get_logger("tandem.sites")

_SWEEP_S = 10.0  # how often the acked-version table forgets sessions ended here


class SiteReplicator:
    """Brings the remote sites' copies of this server's primaries up to date."""

    def __init__(self, ctx: Context, channel: SiteChannel) -> None:
        # configuration
        self.ctx = ctx
        self.channel = channel
        self.sites = ctx.config.sites
        # per site: the (epoch, version) its copy of each session acknowledged, and which
        # of its servers holds that copy
        self.acked: dict[str, dict[str, tuple[int, int]]] = {s.name: {} for s in self.sites}
        self.holder: dict[str, dict[str, str]] = {s.name: {} for s in self.sites}
        # per site: sessions to send in the next batch (WAN; MAN behind after a failure)
        self.dirty: dict[str, dict[str, None]] = {s.name: {} for s in self.sites}
        # per site: last accesses to send (sid -> last_access)
        self.touched: dict[str, dict[str, float]] = {s.name: {} for s in self.sites}
        # per remote server: invalidations it has not acknowledged yet
        self.ended: dict[str, set[str]] = {srv.id: set() for s in self.sites
                                           for srv in s.servers}
        self._kick = asyncio.Event()
        self._behind_logged: set[str] = set()  # sites said to be behind (logged once)
        for key in ("site_sent", "site_failures", "site_behind", "site_deltas",
                    "site_need_full"):
            ctx.stats.setdefault(key, 0)

    # --- hooks of the session manager ---------------------------------------------------

    async def committed(self, record: Primary) -> None:
        """After the local replication of a commit: the remote sites' copies."""
        key = (record.epoch, record.version)
        for site in self.sites:
            name = site.name
            if self.acked[name].get(record.sid) == key:
                self.touched[name][record.sid] = record.last_access  # nothing new
                continue
            if site.mode == "man" and site.remote_sync:
                await self._send_now(site, record)
            else:
                self._queue(site, record.sid)

    async def invalidated(self, sid: str) -> None:
        """An ended session: no remote copy of it may be promoted."""
        calls = []
        for site in self.sites:
            self.acked[site.name].pop(sid, None)
            self.holder[site.name].pop(sid, None)
            self.dirty[site.name].pop(sid, None)
            self.touched[site.name].pop(sid, None)
            for srv in site.servers:
                self.ended[srv.id].add(sid)
                if site.mode == "man" and site.remote_sync and self.channel.alive(srv.id):
                    calls.append(self._deliver_ended(srv.id))
        if calls:
            await asyncio.gather(*calls)
        self._kick.set()  # the others (and any that failed) at once, by the loop

    def behind(self) -> dict[str, int]:
        """Per site, the sessions whose remote copy is older than what was acknowledged."""
        return {name: len(d) for name, d in self.dirty.items()}

    # --- sending ------------------------------------------------------------------------

    def _target(self, site: SiteConfig, sid: str) -> str | None:
        for srv in rank_remote(sid, site.servers):
            if self.channel.alive(srv.id):
                return srv.id
        return None

    def _queue(self, site: SiteConfig, sid: str) -> None:
        dirty = self.dirty[site.name]
        dirty[sid] = None
        self.touched[site.name].pop(sid, None)
        if len(dirty) >= site.flush_threshold:
            self._kick.set()

    async def _send_now(self, site: SiteConfig, record: Primary) -> None:
        target = self._target(site, record.sid)
        if target is None:
            self._fell_behind(site, record.sid, "no server of the site is reachable")
            return
        key = (record.epoch, record.version)  # (what is sent: a request may commit meanwhile)
        state = self._item(site, record, target)
        for _ in range(2):  # a delta, then in full if the holder lost its base
            try:
                reply = await self.channel.links[target].call(
                    {"op": "site_replicate", "items": [state], "persist": False},
                    timeout=self.ctx.timeout)
            except (PeerUnavailable, PeerTimeout) as exc:
                self.ctx.stats["site_failures"] += 1
                self.channel.links[target].fail(str(exc))
                self._fell_behind(site, record.sid, str(exc))
                return
            if record.sid not in reply.get("need_full", ()) or "data" in state:
                break
            self.ctx.stats["site_need_full"] += 1
            state = record.state()
        if not reply.get("ok") or record.sid in reply.get("need_full", ()):
            self._fell_behind(site, record.sid, str(reply.get("error", "need_full")))
            return
        if record.sid in reply.get("moved", ()):
            self._superseded(record.sid, site, target)
            raise SessionMoved(f"site {site.name} took this session over", peer=target)
        self._acked(site.name, record.sid, key, target)
        self.dirty[site.name].pop(record.sid, None)  # (a catch-up of it is not needed now)
        self.ctx.stats["site_sent"] += 1

    def _item(self, site: SiteConfig, record: Primary, target: str) -> dict[str, Any]:
        """The copy to send `target`: a delta on the version it acknowledged, or in full."""
        acked = self.acked[site.name].get(record.sid)
        if (acked is None or acked[0] != record.epoch
                or self.holder[site.name].get(record.sid) != target):
            return record.state()
        data, changed = record.data, record.site_pending
        self.ctx.stats["site_deltas"] += 1
        return {"sid": record.sid, "v": record.version, "e": record.epoch, "base": acked[1],
                "set": {k: v for k, v in data.items() if k in changed},
                "del": [k for k in changed if k not in data],
                "max_inactive_s": record.max_inactive_s, "created": record.created,
                "last_access": record.last_access, "rid": record.last_rid,
                "undo": record.undo}

    def _acked(self, site: str, sid: str, key: tuple[int, int], holder: str) -> None:
        self.acked[site][sid] = key
        self.holder[site][sid] = holder
        record = self.ctx.store.primaries.get(sid)
        if record is not None and all(self.acked[s.name].get(sid) == (
                record.epoch, record.version) for s in self.sites):
            record.clear_site_pending()  # every remote copy is at this version: no base older

    def holder_lost(self, server: str, site: str) -> None:
        """A remote server's link failed: the copies it held are sent again (to the next
        server in their order) — the session may not be written again before its site is
        lost."""
        holder, acked = self.holder[site], self.acked[site]
        lost = [sid for sid, h in holder.items() if h == server]
        for sid in lost:
            del holder[sid]
            acked.pop(sid, None)
            self.dirty[site][sid] = None
        if lost:
            self._kick.set()

    def _fell_behind(self, site: SiteConfig, sid: str, cause: str) -> None:
        """Acknowledged with the local copies only: the remote copy catches up later."""
        self._queue(site, sid)
        if site.name not in self._behind_logged:
            self._behind_logged.add(site.name)
            log.warning("site_behind", site=site.name, cause=cause)

    def _superseded(self, sid: str, site: SiteConfig, by: str) -> None:
        """The remote site took this session over (it found this site dead): ours ends."""
        record = self.ctx.store.remove(sid)
        if record is not None:
            record.superseded = True
        self.ctx.stats["superseded"] += 1
        log.warning("session_superseded", sid=short(sid), by=by, site=site.name)

    def superseded_there(self, by: str, sids: dict[str, int]) -> None:
        """A remote site took these sessions over while this one was silent (the epochs it
        gave them): our primaries and replicas of older epochs end here."""
        site = self.channel.site_of[by]
        store = self.ctx.store
        for sid, epoch in sids.items():
            record = store.primaries.get(sid)
            if record is not None and record.epoch < epoch:
                self._superseded(sid, site, by)
            replica = store.replicas.get(sid)
            if replica is not None and replica.epoch < epoch:
                del store.replicas[sid]

    async def _deliver_ended(self, server: str) -> None:
        sids = sorted(self.ended[server])
        if not sids:
            return
        try:
            reply = await self.channel.links[server].call(
                {"op": "site_invalidate", "sids": sids}, timeout=self.ctx.timeout)
        except (PeerUnavailable, PeerTimeout) as exc:
            self.channel.links[server].fail(str(exc))
            return
        if reply.get("ok"):
            self.ended[server].difference_update(sids)

    async def flush(self) -> None:
        """One batch per site and remote server: queued copies, touches, invalidations."""
        await asyncio.gather(*(self._deliver_ended(srv) for srv, sids in self.ended.items()
                               if sids and self.channel.alive(srv)))
        for site in self.sites:
            await self._flush_site(site)

    async def _flush_site(self, site: SiteConfig) -> None:
        name = site.name
        dirty, self.dirty[name] = self.dirty[name], {}
        touched, self.touched[name] = self.touched[name], {}
        primaries = self.ctx.store.primaries
        batches: dict[str, list[dict[str, Any]]] = {}
        for sid in dirty:
            record = primaries.get(sid)
            if record is None:
                continue  # ended, or moved to another server here (which sends it)
            target = self._target(site, sid)
            if target is None:
                self.dirty[name].setdefault(sid, None)
                continue
            batches.setdefault(target, []).append(self._item(site, record, target))
        persist = site.mode == "wan"
        results = await asyncio.gather(*(self._send_batch(site, t, items, persist)
                                         for t, items in batches.items()))
        if self.dirty[name]:
            return
        if all(results) and site.name in self._behind_logged:
            self._behind_logged.discard(site.name)
            log.info("site_caught_up", site=name)
        if touched:
            by_target: dict[str, dict[str, float]] = {}
            for sid, last in touched.items():
                target = self._target(site, sid)
                if target is not None:
                    by_target.setdefault(target, {})[sid] = last
            for target, items in by_target.items():
                self.channel.links[target].send({"op": "site_touch", "items": items})

    async def _send_batch(self, site: SiteConfig, target: str, items: list[dict[str, Any]],
                          persist: bool) -> bool:
        name = site.name
        try:
            reply = await self.channel.links[target].call(
                {"op": "site_replicate", "items": items, "persist": persist},
                timeout=self.ctx.timeout + (self.ctx.config.persistence.timeout_s
                                            if persist else 0.0))
        except (PeerUnavailable, PeerTimeout) as exc:
            self.ctx.stats["site_failures"] += 1
            self.channel.links[target].fail(str(exc))
            reply = {"ok": False, "error": str(exc)}
        if not reply.get("ok"):
            for state in items:
                self.dirty[name].setdefault(state["sid"], None)
            if name not in self._behind_logged:
                self._behind_logged.add(name)
                log.warning("site_behind", site=name, cause=str(reply.get("error")))
            return False
        moved = set(reply.get("moved", ()))
        need_full = set(reply.get("need_full", ()))
        for state in items:
            if state["sid"] in moved:
                self._superseded(state["sid"], site, target)
            elif state["sid"] in need_full:  # the holder lost the base: in full, next batch
                self.ctx.stats["site_need_full"] += 1
                self.acked[name].pop(state["sid"], None)
                self.dirty[name][state["sid"]] = None
                self._kick.set()
            else:
                self._acked(name, state["sid"], (int(state["e"]), int(state["v"])), target)
        self.ctx.stats["site_sent"] += len(items)
        return True

    async def loop(self) -> None:
        interval = min(s.flush_interval_s for s in self.sites)
        last_sweep = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), interval)
            self._kick.clear()
            try:
                await self.flush()
            except SessionMoved:  # (only the synchronous path raises it)
                pass
            self.ctx.stats["site_behind"] = sum(self.behind().values())
            if time.monotonic() - last_sweep > _SWEEP_S:
                last_sweep = time.monotonic()
                primaries = self.ctx.store.primaries
                for name, acked in self.acked.items():
                    for sid in [sid for sid in acked if sid not in primaries]:
                        del acked[sid]
                        self.holder[name].pop(sid, None)
