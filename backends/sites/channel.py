"""The inter-site channel of one server: its links to every server of the remote sites, and
its listener for theirs.

The channel is the replication channel's (framed JSON, a mutual HMAC handshake, pings), on
an address of its own (`site_replication`): the local channel's membership and quorum never
see a remote server. Both sides sign the handshake with their own first secret and verify
with their own secrets and the trusted sites' (the `[[sites]]` entries' `secrets`).

What the links say of a remote server is also the evidence of the site-down rule
(takeover.py): a refused connection proves no process listens there; a silent one proves
nothing.
An operator's command (`tandem site-down`, command.py) arrives on the same listener: the
handshake as `@operator` (an id no server can have), then a challenge that only a holder
of this cluster's own secrets answers — a trusted site's secrets open the channel but give
no command here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import inspect
import secrets as secrets_mod
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from tandem.config import Config, ServerConfig
from tandem.sites import SiteConfig
from tandem.tls import site_files_for

from ..cluster import wire
from ..cluster.link import Outbox, PeerLink, PeerState
from ..cluster.tls import Channel, TlsServer
from ..errors import ReplicationError

__all__ = ["SiteChannel", "CHANNEL_NAME", "OPERATOR", "command_mac"]

log = structlog.get_logger("tandem.sites")

CHANNEL_NAME = "tandem.sites"  # what the handshake's MACs bind, beside the secrets
OPERATOR = "@operator"  # the handshake id of an operator's command (no server id has "@")

Reply = dict[str, Any] | None
Handler = Callable[[str, dict[str, Any]], Reply | Awaitable[Reply]]
Operator = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def command_mac(secret: str, server: str, nonce: str, msg: dict[str, Any]) -> str:
    """The proof of an operator's command to `server`: its own cluster secret over the
    server's fresh nonce and the command."""
    text = "|".join(("tandem.operator", server, nonce, str(msg.get("op")),
                     str(msg.get("site"))))
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


class SiteChannel:
    """Links to the remote sites' servers, and the listener their links arrive at."""

    def __init__(self, *, config: Config, me: str, incarnation: str, handler: Handler,
                 operator: Operator, on_alive: Callable[[str], None],
                 on_lost: Callable[[str, str], None]) -> None:
        # configuration
        self.me = config.server(me)
        self.sites = config.sites
        self._handler = handler
        self._operator = operator
        self._own_secrets = tuple(config.cluster.secrets)  # (an operator proves one of these)
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
        # plaintext, or mutual TLS: our own certificate, our CA and the remote sites' CAs
        # (sites[].tls_ca); reloaded like the replication channel's
        self.transport = Channel(config=config, me=me, files=site_files_for(config, me))
        self._local_ids = frozenset(config.server_ids)
        # outbound links, one per remote server (a PeerLink on the remote listener)
        self.links: dict[str, PeerLink] = {
            srv.id: PeerLink(me=me, peer=ServerConfig(id=srv.id, http=srv.http,
                                                      replication=srv.site_replication),
                             config=channel, on_state=self._changed, incarnation=incarnation,
                             on_refused=self._refused, channel=self.transport)
            for site in config.sites for srv in site.servers}
        self.incarnation = incarnation
        # evidence: when (monotonic) each remote server last refused a connection
        self.refused_at: dict[str, float] = {}
        # the listener
        self._server: asyncio.Server | TlsServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Future[None]] = set()

    # --- lifecycle ----------------------------------------------------------------------

    async def bind(self) -> None:
        addr = self.me.site_replication
        assert addr is not None  # (checked at load when [[sites]] are named)
        self._server = await self.transport.listen(
            self._accept, addr.host, addr.port,
            what=f"{self.me.id}'s site_replication address",
            handshake_timeout_s=self._connect_timeout_s)

    async def start(self) -> None:
        if self._server is None:
            await self.bind()
        assert self._server is not None
        await self._server.start_serving()
        self.transport.start()
        for link in self.links.values():
            link.start()

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links.values()))
        await self.transport.close()
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
                known=[*self.site_of, OPERATOR], incarnation=self.incarnation,
                certified=self._certified(writer)), self._connect_timeout_s)
        except (ReplicationError, OSError, TimeoutError) as exc:
            log.warning("site_peer_refused", remote=str(writer.get_extra_info("peername")),
                        reason=str(exc))
            self._conns.discard(writer)
            writer.close()
            return
        peer = dialler.id
        if peer == OPERATOR:
            await self._command(reader, writer)
            return
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

    def _certified(self, writer: asyncio.StreamWriter) -> frozenset[str] | None:
        """The ids the peer's certificate names (None: plaintext); an operator's command
        comes with one of this site's own servers' certificates."""
        named = self.transport.certified(writer)
        if named is not None and named & self._local_ids:
            named = named | {OPERATOR}
        return named

    async def _command(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        """One operator's command: challenge, proof with our own secrets, answer, close."""
        remote = str(writer.get_extra_info("peername"))
        try:
            nonce = secrets_mod.token_hex(16)
            wire.write_frame(writer, {"op": "operator_challenge", "nonce": nonce})
            msg = await asyncio.wait_for(wire.read_frame(reader, peer=OPERATOR),
                                         self._connect_timeout_s)
            mac = msg.get("mac")
            if not isinstance(mac, str) or not any(
                    hmac.compare_digest(command_mac(s, self.me.id, nonce, msg), mac)
                    for s in self._own_secrets):
                log.warning("operator_refused", remote=remote, op=msg.get("op"),
                            reason="not proven with this cluster's secrets")
                wire.write_frame(writer, {"ok": False, "error": "bad credentials (this "
                                          "cluster's own secrets are required)"})
            else:
                log.info("operator_command", remote=remote, op=msg.get("op"),
                         site=msg.get("site"))
                wire.write_frame(writer, await self._operator(msg))
            await writer.drain()
        except (ReplicationError, OSError, TimeoutError) as exc:
            log.warning("operator_refused", remote=remote, reason=str(exc))
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
