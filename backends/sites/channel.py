"""The inter-site channel of one server: its links to every server of the remote sites, and
its listener for theirs.

The channel is the replication channel's (framed JSON, a mutual HMAC handshake, pings), on
an address of its own (`site_replication`): the local channel's membership and quorum never
see a remote server. Both sides sign the handshake with their own first secret and verify
with their own secrets and the trusted sites' (the `[[sites]]` entries' `secrets`).

What the links say of a remote server is also the evidence of the site-down rule
(takeover.py): a refused connection proves no process listens there; a silent one proves
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from tandem.config import Config, ServerConfig
from tandem.sites import SiteConfig
from tandem.startup import listen_errors, listen_now

from ..cluster import wire
from ..cluster.link import Outbox, PeerLink, PeerState
from ..errors import ReplicationError

__all__ = ["SiteChannel", "CHANNEL_NAME"]

log = structlog.get_logger("tandem.sites")

CHANNEL_NAME = "tandem.sites"  # what the handshake's MACs bind, beside the secrets

Reply = dict[str, Any] | None
Handler = Callable[[str, dict[str, Any]], Reply | Awaitable[Reply]]


class SiteChannel:
    """Links to the remote sites' servers, and the listener their links arrive at."""

    def __init__(self, *, config: Config, me: str, incarnation: str, handler: Handler,
                 on_alive: Callable[[str], None],
                 on_lost: Callable[[str, str], None]) -> None:
        # configuration
        self.me = config.server(me)
        self.sites = config.sites
        self._handler = handler
        self._on_alive = on_alive  # a remote server authenticated: its site is up
        self._on_lost = on_lost  # (server, site) its link failed or it left
        secrets = tuple(config.cluster.secrets) + tuple(
            s for site in config.sites for s in site.secrets)
        self._secrets = secrets
        self._connect_timeout_s = config.cluster.peer_connect_timeout_s
        channel = dataclasses.replace(config, cluster=dataclasses.replace(
            config.cluster, name=CHANNEL_NAME, secrets=secrets))
        self.site_of: dict[str, SiteConfig] = {
            srv.id: site for site in config.sites for srv in site.servers}
        # outbound links, one per remote server (a PeerLink on the remote listener)
        self.links: dict[str, PeerLink] = {
            srv.id: PeerLink(me=me, peer=ServerConfig(id=srv.id, http=srv.http,
                                                      replication=srv.site_replication),
                             config=channel, on_state=self._changed, incarnation=incarnation,
                             on_refused=self._refused)
            for site in config.sites for srv in site.servers}
        self.incarnation = incarnation
        # evidence: when (monotonic) each remote server last refused a connection
        self.refused_at: dict[str, float] = {}
        # the listener
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Future[None]] = set()

    # --- lifecycle ----------------------------------------------------------------------

    async def bind(self) -> None:
        addr = self.me.site_replication
        assert addr is not None  # (checked at load when [[sites]] are named)
        with listen_errors(addr.host, addr.port, f"{self.me.id}'s site_replication address"):
            self._server = await asyncio.start_server(self._accept, addr.host, addr.port,
                                                      start_serving=False)
            listen_now(self._server)

    async def start(self) -> None:
        if self._server is None:
            await self.bind()
        assert self._server is not None
        await self._server.start_serving()
        for link in self.links.values():
            link.start()

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links.values()))
        if self._server is not None:
            self._server.close()
        for writer in list(self._conns):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    # --- what the links say -------------------------------------------------------------

    def alive(self, server_id: str) -> bool:
        link = self.links.get(server_id)
        return link is not None and link.alive

    def _changed(self, peer: str, state: PeerState, cause: str) -> None:
        site = self.site_of[peer].name
        log.info("site_peer_state", site=site, peer=peer, state=state.value, cause=cause)
        if state is PeerState.ALIVE:
            self.refused_at.pop(peer, None)
            self._on_alive(peer)
        elif state in (PeerState.FAILED, PeerState.LEFT):
            self._on_lost(peer, site)

    def _refused(self, peer: str) -> None:
        self.refused_at[peer] = time.monotonic()

    # --- the listener -------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            dialler = await asyncio.wait_for(wire.accept_handshake(
                reader, writer, me=self.me.id, cluster=CHANNEL_NAME, secrets_=self._secrets,
                known=list(self.site_of), incarnation=self.incarnation),
                self._connect_timeout_s)
        except (ReplicationError, OSError, TimeoutError) as exc:
            log.warning("site_peer_refused", remote=str(writer.get_extra_info("peername")),
                        reason=str(exc))
            self._conns.discard(writer)
            writer.close()
            return
        peer = dialler.id
        outbox = Outbox(writer, lambda _, exc: writer.close())
        link = self.links.get(peer)
        if link is not None and not link.alive:
            link.kick()  # it dialled us: it is up, dial it back now
        frames = wire.FrameReader(reader, peer=peer)
        try:
            while True:
                msg = await frames.read()
                if msg.get("op") == "leaving":
                    continue
                try:
                    reply = self._handler(peer, msg)
                except Exception:  # a bug must not kill the channel: answer and log
                    log.exception("site_handler_error", peer=peer, op=msg.get("op"))
                    reply = {"ok": False, "error": "internal error"}
                if reply is not None and inspect.isawaitable(reply):
                    task = asyncio.ensure_future(self._later(outbox, peer, msg, reply))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    continue
                _answer(outbox, msg, reply)
        except (ReplicationError, OSError):
            pass  # the remote server's link dropped: its own side re-dials
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _later(self, outbox: Outbox, peer: str, msg: dict[str, Any],
                     pending: Awaitable[Reply]) -> None:
        try:
            reply = await pending
        except Exception:
            log.exception("site_handler_error", peer=peer, op=msg.get("op"))
            reply = {"ok": False, "error": "internal error"}
        if not outbox.writer.is_closing():
            _answer(outbox, msg, reply)


def _answer(outbox: Outbox, msg: dict[str, Any], reply: Reply) -> None:
    rid = msg.get("id")
    if rid is not None:
        outbox.write(wire.encode_frame({"re": rid, **(reply or {"ok": True})}))
    elif reply is not None:
        outbox.write(wire.encode_frame(reply))
