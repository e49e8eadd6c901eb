"""Sites: session replication across clusters (MAN/WAN, docs/sites.md).

`Sites` is what the session manager sees: hooks at commit, invalidation and take-over, and
the messages of the inter-site channel and of the local peers about remote copies. The
parts: the channel (`channel.py`), the sending side (`replicator.py`), the remote copies
kept here (`copies.py`), the site-down rule with the take-over (`takeover.py`), and the
operator's `tandem site-down` (`command.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from tandem.token import Route

from ..sessions.committing import Committer
from ..sessions.context import Context
from ..sessions.store import Primary
from ..tasks import cancel_and_wait
from .channel import SiteChannel
from .copies import RemoteCopies
from .replicator import SiteReplicator
from .takeover import SiteTakeover

__all__ = ["Sites"]

_SWEEP_S = 30.0  # how often expired remote copies are dropped


class Sites:
    """This server's part in the replication between sites."""

    def __init__(self, ctx: Context, committer: Committer) -> None:
        self.ctx = ctx
        self.copies = RemoteCopies(ctx)
        self.channel = SiteChannel(config=ctx.config, me=ctx.me.id,
                                   incarnation=ctx.membership.incarnation,
                                   handler=self.handle_remote, operator=self.handle_operator,
                                   on_alive=self._server_back,
                                   on_lost=self._server_lost)
        self.replicator = SiteReplicator(ctx, self.channel)
        self.takeover = SiteTakeover(ctx, self.channel, self.copies, committer)
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ----------------------------------------------------------------------

    async def bind(self) -> None:
        await self.channel.bind()

    async def start(self) -> None:
        await self.channel.start()
        self._tasks.append(asyncio.create_task(self.replicator.loop(), name="site-flush"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="site-sweep"))

    async def close(self) -> None:
        """Flush what is queued for the remote sites (bounded), then close the channel."""
        await cancel_and_wait(self._tasks)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.replicator.flush(), 2 * self.ctx.timeout)
        await self.channel.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            self.copies.sweep()

    def _server_lost(self, server: str, site: str) -> None:
        self.replicator.holder_lost(server, site)

    def _server_back(self, server: str) -> None:
        self.takeover.server_back(server)
        self.replicator._kick.set()  # catch the remote copies up now

    # --- hooks of the session manager ---------------------------------------------------

    def is_remote(self, server: str) -> bool:
        """Does this server id name a server of a remote site?"""
        return server in self.channel.site_of

    async def committed(self, record: Primary) -> None:
        await self.replicator.committed(record)

    async def invalidated(self, sid: str) -> None:
        await self.replicator.invalidated(sid)

    async def take_over(self, route: Route) -> Primary | Route | None:
        return await self.takeover.take_over(route)

    def health(self) -> dict[str, Any]:
        return {"down": sorted(self.takeover.down), "behind": self.replicator.behind(),
                "copies": len(self.copies.copies),
                "links": {p: link.state.value for p, link in self.channel.links.items()}}

    # --- messages -----------------------------------------------------------------------

    def handle_local(self, peer: str, msg: dict[str, Any]) -> Any:
        """A peer of this site about remote copies."""
        op = msg.get("op")
        if op == "site_fetch":
            return self.takeover.on_fetch(msg["sid"])
        if op == "site_drop":  # a peer took the session over: so did this site
            site = msg.get("site")
            self.copies.drop(msg["sid"], site=None if site is None else str(site),
                             epoch=int(msg.get("e", 0)))
            return None
        return {"ok": False, "error": f"unknown op {op!r}"}

    def handle_remote(self, peer: str, msg: dict[str, Any]) -> Any:
        """A remote site's server, on the inter-site channel."""
        if self.ctx.promotion.active:  # as if every ended primary's replica were promoted
            self.ctx.promotion.claim_message(msg)
        op = msg.get("op")
        if op == "ping":
            return {"op": "pong"}
        if op == "site_replicate":
            return self.copies.accept(peer, list(msg["items"]), persist=bool(msg["persist"]))
        if op == "site_invalidate":
            return self.copies.invalidate(list(msg["sids"]))
        if op == "site_touch":
            self.copies.touch(dict(msg["items"]))
            return None
        if op == "site_superseded":
            self.replicator.superseded_there(peer, {str(k): int(v)
                                                    for k, v in dict(msg["sids"]).items()})
            return None
        return {"ok": False, "error": f"unknown op {op!r}"}

    async def handle_operator(self, msg: dict[str, Any]) -> dict[str, Any]:
        """An operator's command on the inter-site channel (authenticated: channel.py)."""
        if msg.get("op") == "site_down" and isinstance(msg.get("site"), str):
            return self.takeover.declare_down(msg["site"])
        return {"ok": False, "error": f"unknown command {msg.get('op')!r}"}
