"""A client connection's life: opening and closing, flow control both ways, the backend
connection it keeps between its requests, and answering its requests strictly in order.

Pipelined requests are answered one at a time: requests that arrive while one is in
flight wait in a queue (their bodies buffered) and reading pauses until the queue is
empty. A refused request is answered in its turn, then the connection closes. How the
requests are read — the request pipeline and its fast paths — is proxy/client.py.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import structlog

from .errors import ClientError
from .headers import forwarded_for, simple_response

if TYPE_CHECKING:
    from .context import ProxyContext
    from .exchange import Exchange
    from .exchange_state import ExchangeState
    from .tunnel import Tunnel
    from .upstream import UpstreamProtocol

__all__ = [
    "ClientConnection",
    "PAUSE_PIPELINE",
    "PAUSE_PENDING",
    "PAUSE_UPSTREAM",
    "PAUSE_HALTED",
    "PAUSE_UPGRADE",
]

log = structlog.get_logger("tandem.proxy")

# Why reading from the client is paused (a bit each; reading resumes when none is left).
PAUSE_PIPELINE = 1  # a request is queued behind the one in flight
PAUSE_PENDING = 2  # body held while no backend connection is ready
PAUSE_UPSTREAM = 4  # the backend's write buffer is full
PAUSE_HALTED = 8  # the connection is being refused or closed: read nothing more
PAUSE_UPGRADE = 16  # bytes after an upgrade request wait for the backend's answer


class ClientConnection(asyncio.Protocol):
    """One client connection, but for the reading of its requests (ClientProtocol)."""

    __slots__ = (
        "ctx",
        # per connection
        "transport", "write", "writelines", "client_ip", "for_node", "active", "queue",
        "incoming", "read_paused", "write_paused", "closed", "served", "idle_mark",
        "idle_since", "pending_error", "tunnel", "upgrade_buf", "own_upstream",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx

        self.transport: asyncio.Transport | None = None
        self.client_ip = b"unknown"
        self.for_node = b"for=unknown"
        self.active: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.incoming: Exchange | None = None  # the request whose body is being parsed
        self.read_paused = 0  # bit set of the PAUSE_... reasons above
        self.write_paused = False
        self.closed = False
        # Idle watch (close_if_idle): exchanges completed, that count when last looked at,
        # and since when it has not moved.
        self.served = 0
        self.idle_mark = -1
        self.idle_since = 0.0
        self.pending_error: ClientError | None = None  # to answer once the queue is empty
        self.tunnel: Tunnel | None = None
        self.upgrade_buf: list[bytes] | None = None
        # An idle backend connection this connection keeps between its requests: a client
        # tends to stay with one backend (its session's), and the next request to that
        # backend goes out on it with no trip through the pool (see Exchange._try). Given
        # back to the pool when the next request goes elsewhere, when the housekeeping
        # finds this connection idle (so that the pool's keep-alive limit applies), and
        # when this connection closes.
        self.own_upstream: UpstreamProtocol | None = None

    # --- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.write = transport.write  # type: ignore[attr-defined]
        self.writelines = transport.writelines  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            ip = str(peer[0])
            self.client_ip = ip.encode("ascii")
            self.for_node = forwarded_for(ip)
        self.ctx.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        self.give_back_upstream()
        if self.tunnel is not None:
            self.tunnel.client_lost()
            return
        if self.active is not None:
            self.active.abort()
        for ex in self.queue:
            ex.abort()
        self.queue.clear()
        self.active = self.incoming = None

    def eof_received(self) -> bool | None:
        """The client half-closed: answer what it asked for, then close."""
        self.read_paused |= PAUSE_HALTED
        if self.tunnel is not None or self.incoming is not None or self.active is None:
            return None  # nothing complete to answer: close now
        return True  # keep the transport open for the response; exchange_done closes it

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.give_back_upstream()
            self.read_paused |= PAUSE_HALTED
            if self.transport is not None:
                self.transport.close()

    def give_back_upstream(self) -> None:
        """Return the backend connection this connection keeps (if any) to its pool."""
        up = self.own_upstream
        if up is not None:
            self.own_upstream = None
            up.pool.put(up)

    def is_idle(self) -> bool:
        return self.active is None and self.tunnel is None and self.upgrade_buf is None

    def close_if_idle(self, now: float, idle_s: float) -> None:
        """Close a keep-alive connection with no request in flight for idle_s (slow heads
        included). Called about once a second: the idle time is counted from the first
        call that finds the connection idle (no clock read per request)."""
        if not self.is_idle():
            self.idle_mark = -1
        elif self.idle_mark != self.served:
            self.idle_mark = self.served
            self.idle_since = now
            # From here on its backend connection idles in the pool, whose keep-alive
            # limit and sweep apply (counted from now, within a sweep of its last use).
            self.give_back_upstream()
        elif now - self.idle_since > idle_s:
            self.close()

    # --- flow control -------------------------------------------------------------------------

    def _pause(self, bit: int) -> None:
        if not self.read_paused and self.transport is not None:
            self.transport.pause_reading()
        self.read_paused |= bit

    def _resume(self, bit: int) -> None:
        if self.read_paused & bit:
            self.read_paused &= ~bit
            if not self.read_paused and self.transport is not None:
                self.transport.resume_reading()

    def pause_reading_pending(self) -> None:
        self._pause(PAUSE_PENDING)

    def resume_reading_pending(self) -> None:
        self._resume(PAUSE_PENDING)

    def pause_reading_upstream(self) -> None:
        self._pause(PAUSE_UPSTREAM)

    def resume_reading_upstream(self) -> None:
        self._resume(PAUSE_UPSTREAM)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel is not None:
            self.tunnel.pause_upstream()
        elif self.active is not None and self.active.upstream is not None:
            self.active.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tunnel is not None:
            self.tunnel.resume_upstream()
        elif self.active is not None and self.active.upstream is not None:
            self.active.upstream.resume_reading()

    # --- answering ----------------------------------------------------------------------------

    def exchange_done(self, ex: ExchangeState, keep: bool) -> None:
        """The active exchange has written its whole response (`keep`: the connection may
        carry another request)."""
        if ex is not self.active:
            return
        self.active = None
        self.served += 1
        if self.read_paused:
            self._resume(PAUSE_PENDING | PAUSE_UPSTREAM)
        if self.closed:
            return
        if self.incoming is ex:  # answered before its body was read: cannot continue
            keep = False
        if not keep or (self.ctx.closing and not self.queue):
            self.close()
            return
        if self.queue:
            nxt = self.active = self.queue.popleft()
            if not self.queue:
                self._resume(PAUSE_PIPELINE)
            self.ctx.loop.call_soon(self._start, nxt)
            return
        if self.pending_error is not None:
            self._answer_error(self.pending_error)
            return
        if self.read_paused & PAUSE_HALTED:  # half-closed by the client: nothing more comes
            self.close()

    def _start(self, ex: Exchange) -> None:
        if ex is not self.active or ex.finished or self.closed:
            return
        try:
            ex.start()
        except Exception as exc:
            self._internal_error(exc)

    def _reject(self, err: ClientError) -> None:
        """The request being parsed is refused: answer it in turn, then close."""
        self._pause(PAUSE_HALTED)
        self.ctx.metrics.client_errors += 1
        log.info("client_error", status=err.status, error=str(err),
                 client=self.client_ip.decode("ascii", "replace"))
        ex, self.incoming = self.incoming, None
        if ex is not None:
            if ex is self.active:
                ex.fail_client(err)
                return
            if ex in self.queue:
                self.queue.remove(ex)
            ex.abort()
        self.pending_error = err
        if self.active is None:
            self._answer_error(err)

    def _answer_error(self, err: ClientError) -> None:
        self.pending_error = None
        text = str(err) or err.reason.decode("ascii")
        self.write(simple_response(err.status, err.reason, text, close=True))
        self.ctx.metrics.responses[err.status // 100] += 1
        self.close()

    def _internal_error(self, exc: BaseException) -> None:
        self.ctx.metrics.internal_errors += 1
        log.error("internal_error", client=self.client_ip.decode("ascii", "replace"),
                  exc_info=exc)
        self._pause(PAUSE_HALTED)
        active = self.active
        if active is not None and not active.finished:
            active.on_internal_error(exc)  # answers 500 unless already responding
            return
        self.write(simple_response(500, b"Internal Server Error", "internal proxy error",
                                   close=True))
        self.ctx.metrics.responses[5] += 1
        self.close()
