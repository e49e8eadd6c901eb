"""Connections to backends: an upstream connection's life (kept by a client connection
between its requests, pooled, closed) and flow control, and a keep-alive pool per backend
(bounded idle connections, idle timeout `proxy.keepalive_s`).

An upstream connection serves one exchange at a time; the exchange receives the parser's
events and decides what they mean (relay, fail over, retry). How a response is read — the
response pipeline and its fast paths — is proxy/responses.py.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .errors import UpstreamConnectError, map_connect_errors
from .responses import ResponseReader

if TYPE_CHECKING:
    from .client import ClientProtocol
    from .router import Backend

__all__ = ["UpstreamProtocol", "Pool"]


class UpstreamProtocol(ResponseReader):
    """One keep-alive HTTP/1.1 connection to a backend."""

    __slots__ = ("pool", "reading_paused", "writing_paused", "requests", "idle_since")

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self.reading_paused = False
        self.writing_paused = False

        self.requests = 0  # exchanges completed on this connection
        self.idle_since = 0.0

    # --- lifecycle ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def release(self, client: ClientProtocol | None = None) -> None:
        """The exchange is over and the connection can carry another one: kept by
        `client` (the client connection it served, if given) for its next request, when
        that connection is still open and keeps none yet; else back to the pool, most
        recently used last (see Pool.put)."""
        self.exchange = None
        self.requests += 1
        if self.reading_paused:
            self.resume_reading()
        pool = self.pool
        if (client is not None and client.own_upstream is None and not client.closed
                and not pool.closed and not client.ctx.closing):
            client.own_upstream = self
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if pool.closed or len(pool.idle) >= pool.max_idle:
            transport.close()
            return
        self.idle_since = pool.loop.time()
        pool.idle.append(self)

    def close(self) -> None:
        """Close without telling the exchange (it already knows)."""
        self.pool.discard(self)
        super().close()

    def abort(self) -> None:
        self.exchange = None
        self.pool.discard(self)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
            return
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            try:
                ex.on_upstream_lost(self, exc)
            except Exception as err:  # a bug: the exchange answers once and closes
                ex.on_internal_error(err)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost reports it

    # --- flow control -------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.tunnel is not None:
            self.tunnel.pause_client()
        elif self.exchange is not None:
            self.exchange.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.tunnel is not None:
            self.tunnel.resume_client()
        elif self.exchange is not None:
            self.exchange.upstream_resume_writing()


class Pool:
    """Idle keep-alive connections to one backend, most recently used first."""

    __slots__ = ("backend", "loop", "_connect_timeout_s", "_keepalive_s", "max_idle", "idle",
                 "closed")

    def __init__(self, backend: Backend, *, loop: asyncio.AbstractEventLoop,
                 connect_timeout_s: float, keepalive_s: float, max_idle: int) -> None:
        self.backend = backend
        self.loop = loop
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self.max_idle = max_idle
        self.idle: list[UpstreamProtocol] = []
        self.closed = False

    @property
    def idle_count(self) -> int:
        return len(self.idle)

    def take(self) -> UpstreamProtocol | None:
        """An idle connection that still looks alive, or None."""
        idle = self.idle
        while idle:
            up = idle.pop()
            transport = up.transport
            if transport is None or transport.is_closing():
                continue
            if self.loop.time() - up.idle_since > self._keepalive_s:
                transport.close()
                continue
            return up
        return None

    def put(self, up: UpstreamProtocol) -> None:
        transport = up.transport
        if transport is None or transport.is_closing():
            return
        if self.closed or len(self.idle) >= self.max_idle:
            transport.close()
            return
        up.idle_since = self.loop.time()
        self.idle.append(up)

    def discard(self, up: UpstreamProtocol) -> None:
        if up in self.idle:
            self.idle.remove(up)

    async def connect(self) -> UpstreamProtocol:
        """Open a new connection (raises UpstreamConnectError or UpstreamConnectTimeout)."""
        if self.closed:
            raise UpstreamConnectError("pool closed", backend_id=self.backend.id)
        address = self.backend.address
        with map_connect_errors(self.backend.id):
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await self.loop.create_connection(
                    lambda: UpstreamProtocol(self), address.host, address.port)
        return protocol

    def clear_idle(self) -> None:
        """Close every idle connection (one was found dead: the others may be too)."""
        idle, self.idle = self.idle, []
        for up in idle:
            if up.transport is not None:
                up.transport.close()

    def sweep(self) -> None:
        """Close connections idle for longer than keepalive_s (oldest are at the front)."""
        deadline = self.loop.time() - self._keepalive_s
        idle = self.idle
        n = 0
        while n < len(idle) and idle[n].idle_since < deadline:
            n += 1
        if n:
            expired = idle[:n]
            del idle[:n]
            for up in expired:
                if up.transport is not None:
                    up.transport.close()

    def close(self) -> None:
        self.closed = True
        self.clear_idle()
