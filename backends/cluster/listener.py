"""The replication listener: accepts the peers' links, authenticates them, and hands their
messages to the session manager, answering at once or when the answer is ready."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ..errors import PeerUnavailable, ReplicationError
from . import wire
from .link import Outbox
from .membership import Membership
from .tls import TlsServer

__all__ = ["ReplicationListener", "Handler", "Reply"]

log = structlog.get_logger("tandem.peers")

Reply = dict[str, Any] | None
# A handler answers at once, or returns an awaitable when the answer needs network work.
Handler = Callable[[str, dict[str, Any]], Reply | Awaitable[Reply]]


class ReplicationListener:
    """Accepts the peers' links, authenticates them, and answers their messages."""

    def __init__(self, *, membership: Membership, handler: Handler) -> None:
        self._membership = membership
        self._handler = handler
        self._server: asyncio.Server | TlsServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        # each peer's current inbound connection: the newest it authenticated. Only its loss
        # says something about the peer; an older one closing (left over from before a
        # partition or a stall, superseded since) says nothing.
        self._current: dict[str, asyncio.StreamWriter] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._closing = False

    async def bind(self) -> None:
        """Bind and listen before any peer is dialled (theirs wait in the backlog until
        `start`): a taken address fails here, with nothing started (ListenError)."""
        me = self._membership.me
        addr = me.replication_bind or me.replication  # the peers dial me.replication
        self._server = await self._membership.channel.listen(
            self._accept, addr.host, addr.port, what=f"{me.id}'s replication address",
            handshake_timeout_s=self._membership.config.cluster.peer_connect_timeout_s)

    async def start(self) -> None:
        if self._server is None:
            await self.bind()
        assert self._server is not None
        await self._server.start_serving()

    def leaving(self) -> None:
        """We are about to say goodbye: a peer that closes its link to us from now on is
        answering our goodbye, not failing."""
        self._closing = True

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._conns):
            writer.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        m = self._membership
        cluster = m.config.cluster
        self._conns.add(writer)  # from the start: a close() mid-handshake closes it too
        try:
            dialler = await asyncio.wait_for(wire.accept_handshake(
                reader, writer, me=m.me.id, cluster=cluster.name, secrets_=cluster.secrets,
                known=m.roster, incarnation=m.incarnation, admit=m.admit_dialler,
                certified=m.channel.certified(writer)), cluster.peer_connect_timeout_s)
        except (ReplicationError, OSError, TimeoutError) as exc:
            peername = writer.get_extra_info("peername")
            if isinstance(exc, PeerUnavailable | ConnectionError):
                # the dialler hung up before it finished (it is stopping, or gave up): no
                # reason to warn about anybody
                log.info("peer_dial_abandoned", remote=str(peername), reason=str(exc))
            else:  # (once per peer host and reason in a while: it re-dials every beat)
                m.channel.refused("accept", _shown(peername), str(exc), event="peer_refused",
                                  peer=exc.peer if isinstance(exc, ReplicationError) else "?")
            self._conns.discard(writer)
            writer.close()
            return
        except BaseException:  # cancelled (the server stops): the socket goes with us
            self._conns.discard(writer)
            writer.transport.abort()
            raise
        peer = dialler.id
        if self._closing:  # authenticated while we closed: not adopted, closed
            self._conns.discard(writer)
            writer.close()
            return
        older = self._current.get(peer)
        self._current[peer] = writer
        if older is not None:
            older.close()  # the peer dialled again: it has given the older one up
        outbox = Outbox(writer, lambda _, exc: writer.close())
        link = m.links[peer]
        if not link.alive:
            link.kick()  # it dialled us, so it is up: dial it back now
        graceful = False
        frames = wire.FrameReader(reader, peer=peer)
        try:
            while True:
                msg = await frames.read()
                op = msg.get("op")
                if type(op) is str and op[:2] in ("v_", "l_"):
                    m.receive(peer, msg)  # the view consensus and the leases
                    continue
                if op == "ping":
                    m.heard(peer, dialler.incarnation)
                elif op == "leaving":
                    graceful = True
                    link.left()
                    m.said_goodbye(peer)
                    continue
                if op == "draining":
                    link.draining()
                try:
                    reply = self._handler(peer, msg)
                except Exception:  # a bug must not kill the channel: answer and log
                    log.exception("replication_handler_error", peer=peer, op=op)
                    reply = {"ok": False, "error": "internal error"}
                if type(reply) is not dict and reply is not None and inspect.isawaitable(reply):
                    task = asyncio.ensure_future(self._answer_later(outbox, peer, msg, reply))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    continue
                self._answer(outbox, msg, reply)
        except (ReplicationError, OSError) as exc:
            if not graceful and not isinstance(exc, PeerUnavailable | OSError):
                log.warning("replication_protocol_error", peer=peer, error=str(exc))
            if self._current.get(peer) is not writer:
                log.info("replication_connection_superseded", peer=peer)
            elif not graceful and not self._closing:
                link.fail("replication connection closed")
        finally:
            self._conns.discard(writer)
            if self._current.get(peer) is writer:
                del self._current[peer]
            writer.close()

    @staticmethod
    def _answer(outbox: Outbox, msg: dict[str, Any], reply: Reply) -> None:
        rid = msg.get("id")
        if rid is not None:
            outbox.write(wire.encode_frame({"re": rid, **(reply or {"ok": True})}))
        elif reply is not None:
            outbox.write(wire.encode_frame(reply))

    async def _answer_later(self, outbox: Outbox, peer: str,
                            msg: dict[str, Any], pending: Awaitable[Reply]) -> None:
        try:
            reply = await pending
        except Exception:
            log.exception("replication_handler_error", peer=peer, op=msg.get("op"))
            reply = {"ok": False, "error": "internal error"}
        if not outbox.writer.is_closing():
            self._answer(outbox, msg, reply)


def _shown(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername)
