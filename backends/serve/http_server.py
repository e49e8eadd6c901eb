"""The backend's HTTP/1.1 listener: binds before anything else of the server runs, serves
one ASGI application through an `http.HttpProtocol` per connection, writes held response
heads in batches, closes idle keep-alive connections, and shuts down within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import structlog

from tandem.startup import listen_errors, listen_now

from .http import HttpProtocol

if TYPE_CHECKING:
    from .asgi import ASGIApp
    from .cycle import RequestCycle

__all__ = ["HttpServer"]

log = structlog.get_logger("tandem.http")


class HttpServer:
    """A listener serving one ASGI application (async context manager)."""

    def __init__(self, app: ASGIApp, *, host: str, port: int,
                 state: dict[str, Any] | None = None, max_head_bytes: int = 64 * 1024,
                 max_headers: int = 100, body_buffer_bytes: int = 256 * 1024,
                 keepalive_timeout_s: float = 75.0, shutdown_timeout_s: float = 10.0,
                 label: str | None = None) -> None:
        # configuration
        self.app = app
        self.host = host
        self.port = port
        self.label = label  # what start-up errors call this listener ("s1's http address")
        self.state = state if state is not None else {}  # lifespan state, copied per request
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.body_buffer_bytes = body_buffer_bytes
        self.keepalive_timeout_s = keepalive_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        # run-time state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server_addr: tuple[str, int] = (host, port)
        self.connections: set[HttpProtocol] = set()
        self.closing = False  # answer in-flight requests with Connection: close
        self.heads: list[RequestCycle] = []  # response heads to write if no body follows
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HttpServer:
        await self.bind()
        await self.start_serving()
        return self

    async def bind(self) -> None:
        """Bind and listen, not yet accepting (connections wait in the backlog): a taken
        address fails here (ListenError), before the rest of the server starts."""
        self.loop = asyncio.get_running_loop()
        with listen_errors(self.host, self.port, self.label):
            self._server = await self.loop.create_server(
                lambda: HttpProtocol(self), self.host, self.port, backlog=1024,
                reuse_address=True, start_serving=False)
            listen_now(self._server, 1024)
        sock = self._server.sockets[0].getsockname()
        self.server_addr = (str(sock[0]), int(sock[1]))

    async def start_serving(self) -> None:
        """Accept connections (those waiting in the backlog first)."""
        if self._server is None:
            await self.bind()
        assert self._server is not None and self.loop is not None
        with listen_errors(self.host, self.port, self.label):
            await self._server.start_serving()
        self._sweeper = self.loop.create_task(self._sweep(), name="http-idle-sweep")

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop like a runbook; safe to call more than once."""
        # 1. Stop accepting new connections.
        if self._server is not None:
            self._server.close()
        # 2. Idle keep-alive connections close now; in-flight requests get their response
        #    (with Connection: close); websockets are closed with 1001 (going away).
        self.closing = True
        for conn in list(self.connections):
            conn.shutdown()
        deadline = time.monotonic() + self.shutdown_timeout_s
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # 3. Whatever is left after the bound is cut off.
        for conn in list(self.connections):
            log.warning("http_shutdown_abort", client=str(conn.client))
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        # 4. Stop the idle sweeper.
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def hold_head(self, cycle: RequestCycle) -> None:
        """`cycle`'s head waits for its first body message, or for the end of this loop
        iteration (one callback for all the connections: the body nearly always comes)."""
        if not self.heads:
            assert self.loop is not None
            self.loop.call_soon(self._flush_heads)
        self.heads.append(cycle)

    def _flush_heads(self) -> None:
        heads, self.heads = self.heads, []
        for cycle in heads:
            cycle.flush_head()

    async def _sweep(self) -> None:
        """Close connections idle (between requests, or in a head) for too long."""
        tick = min(1.0, self.keepalive_timeout_s / 2)
        while True:
            await asyncio.sleep(tick)
            limit = time.monotonic() - self.keepalive_timeout_s
            for conn in list(self.connections):
                if conn.cycle is None and conn.ws is None and conn.last_active < limit:
                    conn.close()
