"""Taking a remote site's session over: the site-down rule, then the copy promoted here.

Two sites have no majority between them: a site that only stopped answering (a cut link, a
hung host) may still be serving its sessions, and promoting our copy would make two
primaries. So a remote session is taken over only when its whole site is *proven* down:
every server of it that this server knows refused a connection just now (no process
listens there — as the local quorum takes a refusal for proof of death). A site that is
silent is not proven down: its sessions get a 503 (`X-Tandem-State: site-up`) here.

The copy: ours, or a peer's of this site (asked over the local channel), or — for WAN —
this site's store; the newest (epoch, version) wins. It becomes a primary here with a new
epoch, gets a local secondary before the handler runs, and the response carries a token of
this site.

An operator may declare a silent site down (`tandem site-down`, `declare_down`): its hosts
are off or cut off, and it is known to serve nothing. Either way, once a server of the site
is heard again the site counts as up, and it is told which of its sessions were taken over
here (`site_superseded`): its servers drop their primaries and replicas of them, so that a
site that was only silent does not go on serving them beside us.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from tandem.logs import short
from tandem.sites import SiteConfig, SiteServer
from tandem.token import Route

from ..errors import NotServing, PeerTimeout, PeerUnavailable
from ..sessions.committing import Committer
from ..sessions.context import Context, age
from ..sessions.store import Primary
from .channel import SiteChannel
from .copies import RemoteCopies

__all__ = ["SiteTakeover"]

log = structlog.get_logger("tandem.sites")


class SiteTakeover:
    """Promotes remote copies once their site is proven down."""

    def __init__(self, ctx: Context, channel: SiteChannel, copies: RemoteCopies,
                 committer: Committer) -> None:
        self.ctx = ctx
        self.channel = channel
        self.copies = copies
        self.committer = committer
        self.down: set[str] = set()  # sites proven down (until one of their servers is back)
        self._started = time.monotonic()
        ctx.stats.setdefault("site_taken_over", 0)

    def server_back(self, server: str) -> None:
        site = self.channel.site_of[server].name
        if site in self.down:
            self.down.discard(site)
            log.warning("site_up", site=site, server=server)
        taken = self.copies.moved_from(site)
        if taken and self.channel.links[server].send({"op": "site_superseded", "sids": taken}):
            log.info("site_supersede_sent", site=site, server=server, sessions=len(taken))

    def declare_down(self, name: str) -> dict[str, Any]:
        """An operator says site `name` is down (off, or fenced): its sessions are taken
        over here at their next request. Refused while a server of it answers here."""
        site = next((s for s in self.channel.sites if s.name == name), None)
        if site is None:
            return {"ok": False, "error": f"no site named {name!r} in this server's file"}
        answering = [s.id for s in site.servers if self.channel.alive(s.id)]
        if answering:
            log.warning("site_down_refused", site=name, by="operator", answering=answering)
            return {"ok": False, "error": f"site {name} answers here ({', '.join(answering)} "
                    "linked): it is not down"}
        already = name in self.down
        self.down.add(name)
        log.warning("site_down", site=name, proof="declared by an operator", already=already)
        return {"ok": True, "already": already}

    # --- the site-down rule -------------------------------------------------------------

    async def proven_down(self, site: SiteConfig) -> bool:
        if site.name in self.down:
            return True
        now = time.monotonic()
        if any(self.channel.alive(s.id) for s in site.servers):
            return False
        refused = await asyncio.gather(*(self._refuses(s) for s in site.servers))
        if all(refused):
            proof = "every server refused a connection"
        elif site.takeover_after_s and now - self._last_heard(site) > site.takeover_after_s:
            proof = f"silent for more than takeover_after_s ({site.takeover_after_s:g} s)"
        else:
            return False
        self.down.add(site.name)
        log.warning("site_down", site=site.name, proof=proof)
        return True

    def _last_heard(self, site: SiteConfig) -> float:
        """When (monotonic) a server of the site was last heard on its link (or we
        started: a site never heard since is given the same time)."""
        return max([self._started, *(self.channel.links[s.id].last_heard
                                     for s in site.servers)])

    async def _refuses(self, srv: SiteServer) -> bool:
        addr = srv.site_replication
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(addr.host, addr.port),
                                               self.ctx.config.cluster.peer_connect_timeout_s)
        except ConnectionRefusedError:
            return True
        except (OSError, TimeoutError):
            return False  # unreachable or silent: proves nothing
        writer.close()
        return False

    # --- taking over --------------------------------------------------------------------

    async def take_over(self, route: Route) -> Primary | Route | None:
        """The session of a remote site's token, promoted here; a Route when another server
        of this site serves it already (the caller fetches it there); None: found nowhere."""
        ctx = self.ctx
        sid = route.sid
        site = self.channel.site_of[route.primary]
        if not await self.proven_down(site):
            raise NotServing(f"session of site {site.name}, which is not proven down",
                             peer=ctx.me.id, state="site-up")
        best, source = self.copies.get(sid), "copy"
        for peer, reply in await self._ask_peers(sid):
            if reply.get("served_by"):
                return Route(sid, str(reply["served_by"]), None)
            if reply.get("found") and (best is None or age(reply) > age(best)):
                best, source = reply, peer
        if best is None and ctx.persister is not None:
            best, source = await ctx.persister.load(sid), "store"
        raced = ctx.store.primaries.get(sid)
        if raced is not None:
            return raced
        if best is None or time.time() - float(best["last_access"]) > float(
                best["max_inactive_s"]):
            ctx.stats["lost"] += 1
            log.warning("session_lost", sid=short(sid), primary=route.primary, site=site.name)
            return None
        record = Primary(sid, data=dict(best["data"]), version=int(best["v"]),
                         epoch=ctx.next_epoch(int(best.get("e", 0))),
                         max_inactive_s=float(best["max_inactive_s"]),
                         created=float(best["created"]),
                         last_access=float(best["last_access"]),
                         last_rid=best.get("rid"), undo=best.get("undo"))
        ctx.store.primaries[sid] = record
        self.copies.drop(sid, site=site.name, epoch=record.epoch)
        for member in ctx.membership.alive_peers():
            ctx.send(member.id, {"op": "site_drop", "sid": sid, "site": site.name,
                                 "e": record.epoch})
        ctx.stats["site_taken_over"] += 1
        log.warning("site_session_taken_over", sid=short(sid), site=site.name,
                    version=record.version, from_=source)
        if ctx.mode != "none":  # protected here before the handler runs
            ctx.store.assign_secondary(record, ctx.choose_secondary())
            await self.committer.replicate(record)
        return record

    async def _ask_peers(self, sid: str) -> list[tuple[str, dict[str, Any]]]:
        ctx = self.ctx

        async def ask(peer: str) -> tuple[str, dict[str, Any]]:
            try:
                return peer, await ctx.membership.links[peer].call(
                    {"op": "site_fetch", "sid": sid}, timeout=ctx.timeout)
            except (PeerUnavailable, PeerTimeout):
                return peer, {"found": False}

        return list(await asyncio.gather(*(ask(p.id) for p in ctx.membership.alive_peers())))

    def on_fetch(self, sid: str) -> dict[str, Any]:
        """A peer of this site asks for our copy (or who serves the session here)."""
        if sid in self.ctx.store.primaries:
            return {"found": False, "served_by": self.ctx.me.id}
        state = self.copies.get(sid)
        return {"found": False} if state is None else {"found": True, **state}
