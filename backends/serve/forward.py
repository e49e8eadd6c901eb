"""Forwarding a request to its session's primary, and relaying the answer.

Behind a plain load balancer (round-robin, no affinity) a session's requests land on every
server. A server that takes the session over for each of them (`session.foreign_requests =
"take_over"`) moves it on every request, and concurrent requests of one session answer 503
`moved`. With `"forward"` (the default) a server that receives a request for a session
whose primary is another server — alive, not draining, the process the view binds —
sends the request to that primary's advertised http address and relays its answer
(status, headers with Set-Cookie, body as it streams): the session stays where it is.

Over HTTP rather than the replication channel: the primary runs the request through its
own HTTP server and session middleware unchanged (deadline, exactly-once, URL rewriting,
its Set-Cookie), bodies stream both ways with flow control, and the replication channel
is kept free of application bytes.

The hop is marked (`X-Tandem-Hop`, authenticated: backends.serve.hop): the primary serves a
marked request itself and never forwards it again, so no loop is possible. The client's
`X-Tandem-Request-Id` goes along (one is made when the client sent none), and so does a
deadline (`X-Tandem-Deadline`: `proxy.io_timeout_s`, after which the hop is given up).

A request from tandem's proxy (it carries the proxy's `X-Tandem-Deadline`) is never
forwarded: the proxy routes by the token, and sends a request elsewhere than to the
session's primary only when that primary failed it (no connection, a 503, a skip mark) —
the session is then taken over where the request lands, as it always was.

A primary the view still lists but that is silent (dead, hung, cut off) is waited for as a
take-over waits, until the majority removes it; the request then goes to the token's
secondary, which promoted its copy as it adopted that view — the session does not move
here. When the primary cannot be used otherwise, the request is handled here by the
take-over rules of docs/consistency.md (backends/sessions/opening.py), which keep every
acknowledged write:
- nothing was sent (no connection): always;
- the primary refused it before running it (503 `minority`, `starting`, `fenced`,
  `leaving`, `draining`) and its body is held: always;
- it was sent and no answer came (the primary died, hung, or its connection was lost): the
  connection is reset (the primary then applies nothing it reads later, I7) and the client
  gets 503 `owner-unreachable`, which acknowledges nothing. The request is not run here:
  it may have run there, and the exactly-once undo covers only a session's last commit,
  which a concurrent request of the session may have replaced. An answer cut off in its
  body ends the client's response short.
WebSockets are not forwarded: they take the session over as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import MutableMapping
from typing import Any

import structlog

from tandem.config import Config, ServerConfig
from tandem.logs import short
from tandem.token import Route

from ..errors import ForwardError, NotServing
from ..sessions.manager import SessionManager
from .deadline import DEADLINE_HEADER
from .hop import HOP_HEADER, HopAuth
from .hop_client import HopConnection, HopPool

__all__ = ["Forwarder", "HOP_HEADER"]

log = structlog.get_logger("tandem.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]

_RID_HEADER = b"x-tandem-request-id"
_STATE_HEADER = b"x-tandem-state"
# Not passed on to the primary: hop-by-hop fields, the framing (ours), and the fields this
# module sets itself (a client's `X-Tandem-Hop` in particular).
_REQUEST_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
    b"transfer-encoding", b"content-length", b"expect", HOP_HEADER, _RID_HEADER,
    DEADLINE_HEADER})
# Not relayed to the client: hop-by-hop fields; the framing and Date are our server's.
_RESPONSE_DROP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"trailer", b"upgrade",
    b"transfer-encoding", b"date"})
# A request body up to this size (bytes) is held whole before it is sent, so that the
# request can still run here if the primary refuses it unrun; a longer one streams through.
HELD_BODY_BYTES = 65536
# The primary's 503 states that mean "this server serves no session now": it ran nothing.
_REFUSED = frozenset({b"minority", b"starting", b"fenced", b"leaving", b"draining"})
# The states of a 503 about one session (the proxy keeps the server in place): relayed as
# they are; the primary's others are relayed as `owner-unreachable`.
_SESSION_STATES = frozenset({b"unprotected", b"owner-unreachable", b"late"})


class Forwarder:
    """Decides whether a request goes to its session's primary, and takes it there."""

    def __init__(self, *, manager: SessionManager, config: Config) -> None:
        # configuration
        self.forwarding = config.session.foreign_requests == "forward"
        self.auth = HopAuth(config.cluster.secrets)
        self.io_timeout_s = config.proxy.io_timeout_s
        # shared state, read per request
        self.ctx = manager.ctx
        self.me = manager.me.id
        self.pool = HopPool(connect_timeout_s=config.proxy.connect_timeout_s)

    # --- the decision -------------------------------------------------------------------

    def foreign(self, route: Route) -> bool:
        """Might this request go elsewhere (forwarding on, and its session's primary not
        here)? The per-request check, before anything is awaited."""
        return self.forwarding and route.sid not in self.ctx.store.primaries

    async def handle(self, scope: Scope, receive: Any, send: Any, *, route: Route | None,
                     hop: bytes | None, rid: str | None) -> tuple[Any, str | None] | None:
        """Forward the request if its session's primary is another live server: None once
        answered, else the ASGI `receive` and request id with which to handle it here."""
        if hop is not None and self._accept(scope, hop, rid):
            return receive, rid  # forwarded to us: served here, never sent on
        if route is None or not self.foreign(route):
            return receive, rid
        try:
            peer = await self._target(route)
        except NotServing:
            await _send_unanswered(send, b"the session's server is unreachable; retry\n")
            return None
        if peer is None:
            return receive, rid
        return await self.forward(scope, receive, send, peer=peer, sid=route.sid, rid=rid)

    async def _target(self, route: Route) -> ServerConfig | None:
        """The server to forward this request to, or None: handle it here."""
        ctx = self.ctx
        membership = ctx.membership
        sid = route.sid
        if sid in ctx.opening:
            return None  # being taken over here already
        if ctx.promotion.active and ctx.promotion.claim(sid) is not None:
            return None  # its primary ended: promoted here (backends/sessions/promotion.py)
        # Who is primary: where we handed it, what our replica names, what the token says.
        local = ctx.store.replicas.get(sid)
        owner = ctx.moved_to.get(sid) or (local.primary if local is not None else None) \
            or route.primary
        if owner == self.me:
            return None
        peer = membership.serving_peer(owner)
        if peer is not None:
            return peer
        if membership.serving_state() is not None:
            return None  # no lease here (cut off, fenced...): the take-over path says so
        if (membership.in_view(owner) and not membership.is_alive(owner)
                and not membership.recently_stalled()):
            # Silent, and still in the view: dead or cut off. Only the majority may end it
            # (docs/consistency.md, I2); wait for that as a take-over would, so that the
            # request can then go where the session lives, rather than move it here.
            await self._await_removal(owner, sid)
        if membership.in_view(owner) or ctx.promotion.claim(sid) is not None:
            return None  # draining, or promoted here: the take-over rules decide
        # Removed from the view: the token's secondary promoted its copy as it adopted
        # that view (I3), and serves the session now.
        successor = route.secondary if owner == route.primary else None
        if successor is None or successor == self.me:
            return None
        return membership.serving_peer(successor)

    async def _await_removal(self, owner: str, sid: str) -> None:
        """Wait, as long as a take-over would (backends/sessions/opening.py), for the view
        to remove the silent `owner`; NotServing (`owner-unreachable`) if it does not."""
        ctx = self.ctx
        membership = ctx.membership
        c = ctx.config.cluster
        timeout = c.heartbeat_interval_s * (2 * c.missed_heartbeats + 1)

        def waiting() -> bool:
            return sid not in ctx.store.primaries and membership.in_view(owner) and (
                not membership.is_alive(owner))

        if not await membership.wait_view(waiting, timeout, redial=[owner]):
            raise NotServing(f"{owner} unreachable and still in the view", peer=self.me,
                             state="owner-unreachable")

    def _accept(self, scope: Scope, hop: bytes, rid: str | None) -> bool:
        """Is this a request a peer forwarded to us? Its mark is dropped either way."""
        scope["headers"] = [(n, v) for n, v in scope["headers"] if n != HOP_HEADER]
        client = self.auth.verify(hop, rid=rid, method=scope["method"],
                                  target=_target(scope))
        if client is None:
            log.warning("forward_hop_refused", rid=rid, client=_client(scope))
            return False
        if client != "-":  # the app sees the client, not the forwarding server
            host, _, port = client.rpartition(":")
            with contextlib.suppress(ValueError):
                scope["client"] = (host.strip("[]"), int(port))
        return True

    # --- the hop ------------------------------------------------------------------------

    async def forward(self, scope: Scope, receive: Any, send: Any, *, peer: ServerConfig,
                      sid: str, rid: str | None) -> tuple[Any, str] | None:
        """Forward the request to `peer` and relay its answer: None once answered, else
        the ASGI `receive` with which to handle the request here (its body replayed) and
        its request id (made here if the client sent none)."""
        method: str = scope["method"]
        length, chunked = _framing(scope["headers"])
        held = not chunked and length <= HELD_BODY_BYTES
        body: bytes | None = b""
        if held and length:
            body = await _read_body(receive)
        if body is None:
            return None  # the client left: nobody to answer
        local = _replay(body, receive) if held else receive
        rid = rid or _new_rid()
        budget_s = self.io_timeout_s
        head = self._head(scope, rid=rid, budget_s=budget_s,
                          length=length if held else None)
        log_ctx = {"sid": short(sid), "to": peer.id, "rid": rid}
        conn: HopConnection | None = None
        try:
            conn = await self.pool.acquire(peer.id, peer.http)
            conn.head_only = method == "HEAD"
            if held:
                await conn.write(head + body)
            else:
                await conn.write(head)
                if not await conn.write_chunked(receive):
                    conn.reset()
                    return None  # the client left mid-body
            if await self._relay(conn, receive, send, budget_s, held, log_ctx):
                self.ctx.stats["forwarded"] += 1
                return None
            return local, rid  # refused by the primary before it ran: run it here
        except ForwardError as exc:
            if conn is not None:
                conn.reset()
            if exc.answered:
                raise  # its head was relayed: the client's response ends short
            if not exc.sent:
                self.ctx.stats["forward_fallbacks"] += 1
                log.info("forward_fallback", **log_ctx, cause=str(exc))
                return local, rid
            # It may have run there: running it here too could apply it twice (the
            # exactly-once undo covers only a session's last commit, and concurrent
            # requests may have committed since). Not acknowledged: the client retries.
            log.warning("forward_failed", **log_ctx, cause=str(exc))
            await _send_unanswered(send, b"the session's server did not answer; retry\n")
            return None
        except BaseException:  # cancelled (the server stops), or ours to raise
            if conn is not None:
                conn.reset()
            raise

    def _head(self, scope: Scope, *, rid: str, budget_s: float, length: int | None) -> bytes:
        target = _target(scope)
        mark = self.auth.sign(rid=rid, method=scope["method"], target=target,
                              client=_client(scope))
        lines = [b"%s %s HTTP/1.1\r\n" % (scope["method"].encode("ascii"), target)]
        lines += [b"%s: %s\r\n" % (n, v) for n, v in scope["headers"]
                  if n not in _REQUEST_DROP]
        lines.append(b"x-tandem-request-id: %s\r\nx-tandem-deadline: %d\r\n"
                     b"x-tandem-hop: %s\r\n" % (rid.encode("latin-1"),
                                                max(1, int(budget_s * 1000)), mark))
        lines.append(b"content-length: %d\r\n\r\n" % length if length is not None
                     else b"transfer-encoding: chunked\r\n\r\n")
        return b"".join(lines)

    async def _relay(self, conn: HopConnection, receive: Any, send: Any, budget_s: float,
                     held: bool, log_ctx: dict[str, Any]) -> bool:
        """Relay the primary's answer (True), or leave the request to us (False: refused
        by the primary before it ran, body held). The client leaving resets the hop."""
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            reading = asyncio.ensure_future(conn.read_head(budget_s))
            await asyncio.wait((reading, gone), return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError, ForwardError):
                    await reading
                conn.reset()  # the client left: the primary must not apply it later (I7)
                log.info("forward_abandoned", **log_ctx)
                await _send_unanswered(send, b"the client left\n")
                return True
            resp = reading.result()
            headers: list[tuple[bytes, bytes]] = []
            refused = False
            for name, value in resp.headers:
                lname = name.lower()
                if lname in _RESPONSE_DROP:
                    continue
                if lname == _STATE_HEADER and resp.status == 503 and (
                        value not in _SESSION_STATES):
                    # the primary's state, not ours: a proxy in front must not skip us
                    refused = value in _REFUSED
                    value = b"owner-unreachable"
                headers.append((name, value))
            if refused and held:
                self.pool.release(conn)  # (not reusable: its body is unread; closed)
                log.info("forward_refused", **log_ctx, status=resp.status)
                return False
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": headers})
            while True:
                chunk = await conn.read_body(self.io_timeout_s)
                if chunk is None or gone.done():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if gone.done():
                conn.reset()
                return True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self.pool.release(conn)
            log.debug("forwarded", **log_ctx, status=resp.status)
            return True
        finally:
            gone.cancel()

    def close(self) -> None:
        self.pool.close()


def _target(scope: Scope) -> bytes:
    """The request target as the client sent it (`;jsessionid=` included: the primary
    reads and strips it itself)."""
    raw = scope.get("raw_path") or scope["path"].encode("latin-1")
    qs = scope.get("query_string") or b""
    return bytes(raw) + b"?" + qs if qs else bytes(raw)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "-"
    host, port = client[0], client[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _framing(headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    """(Content-Length or 0, chunked) of the request."""
    length, chunked = 0, False
    for name, value in headers:
        if name == b"content-length":
            with contextlib.suppress(ValueError):  # (the HTTP server checked it)
                length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


async def _read_body(receive: Any) -> bytes | None:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that gives the held `body` first, then what `receive` says (the
    request's end: a disconnect once the response is complete or the client left)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        message: Message = await receive()
        return message

    return replay


async def _disconnected(receive: Any) -> None:
    """Returns when the client has gone (the request's body was read whole before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _new_rid() -> str:
    """A request id for a client request that came without one (16 url-safe characters,
    as the proxy's)."""
    return "f" + os.urandom(8).hex()[:15]


async def _send_unanswered(send: Any, body: bytes) -> None:
    """503 `owner-unreachable`: the primary gave no answer (or cannot be reached);
    nothing is acknowledged."""
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"0"), (b"x-tandem-state", b"owner-unreachable")]})
    await send({"type": "http.response.body", "body": body})
