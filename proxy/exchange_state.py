"""An exchange's state and its end: what one request holds on its way to a backend and
back, and how it finishes — answered, answered by the proxy itself, or cut.

An `Exchange` is assembled in stages, one module each, in the order of a request's life:
`ExchangeState` (here), `Attempts` (proxy/attempts.py: choosing a backend, sending, retry
and failover) and `Exchange` (proxy/exchange.py: relaying the response to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import TYPE_CHECKING

import structlog

from tandem.logs import short
from tandem.token import Route

from .errors import ClientError, UpstreamError
from .headers import simple_response, trailer_block

if TYPE_CHECKING:
    from .client import ClientProtocol
    from .context import ProxyContext
    from .router import Backend
    from .upstream import UpstreamProtocol

__all__ = ["ExchangeState"]

log = structlog.get_logger("tandem.proxy")

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def reset(up: UpstreamProtocol) -> None:
    """Give up on a backend connection mid-request: close it with a reset (SO_LINGER 0).

    Why not a FIN: a closed socket's kernel keeps retransmitting what the backend has not
    acknowledged, followed by the FIN — across a partition, until the heal, tens of seconds
    later — and the backend would then read, and apply, a request the proxy has already
    answered (docs/consistency.md, I7). A reset drops those bytes with the socket.
    """
    transport = up.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # (already closed: nothing left to drop)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    up.abort()


class ExchangeState:
    """What an exchange holds, and how it ends (the stages: Attempts, then Exchange)."""

    __slots__ = (
        # set for every request (the lane's essentials)
        "client", "ctx", "method", "head", "route", "keep_alive", "http10", "upgrade",
        "kept", "pending",
        "body_done", "backend", "upstream", "attempts", "written", "unwritten", "sent_at",
        "responded", "finished", "out",
        # the rarely-set state below lives in a dict created on its first write
        "__dict__",
    )

    # Rarely-set state: class-level defaults, so that a request that needs none of it
    # (nearly all) does not pay to write them — measured: as slots set in __init__ they
    # cost 1 000 instructions per request (2.5 % of a `vary` request, 3.8 % of a repeated
    # one; docs/proxy-data-path.md). An instance writes its own value when it must, into
    # its __dict__. Relies on: every default is immutable (None, a bool or a number), so
    # no instance can change another's by mutating one in place. Pinned by
    # test_exchange_class_defaults_are_immutable (tests/test_proxy_lanes.py).
    # request (fixed after the constructor)
    expect_continue = False
    chunked_in = False
    # request body
    kept_bytes = 0
    pending_bytes = 0
    body_bytes = 0
    # attempts
    candidates: list[Backend] | None = None  # computed on the first failure
    next_index = 0
    retried_same = False  # sent to the same backend again after a dead connection
    # The after-send failure behind a retry on the same backend: a failure to connect for
    # that retry is reported as this one (the request may have reached the app).
    retry_cause: UpstreamError | None = None
    connecting: asyncio.Task[None] | None = None
    last_error: UpstreamError | None = None
    # io timeout watch (see check_io): the upstream activity count when check_io last
    # looked, and the loop time since which it has not moved; reset per attempt.
    timer_mark = -1
    quiet_since = 0.0
    # response
    continue_sent = False
    chunk_out = False
    close_after = False

    def __init__(self, client: ClientProtocol, ctx: ProxyContext, method: bytes, head: bytes,
                 route: Route | None) -> None:
        # (the lane's essentials only; the general path sets the rarely-set flags above
        # on the new instance: keywords and their checks cost every request)
        self.client = client
        self.ctx = ctx
        self.method = method
        self.head = head  # upstream request head without X-Tandem-View and the last CRLF
        self.route = route
        self.keep_alive = True  # the client wants the connection kept
        self.http10 = False
        self.upgrade = False  # the request asks for a protocol switch (WebSocket)

        self.kept: list[bytes] | None = []  # the body so far, framed; None: too big to replay
        self.pending: list[bytes] = []  # framed body not yet written to an upstream
        self.body_done = False

        self.backend: Backend | None = None
        self.upstream: UpstreamProtocol | None = None
        self.attempts = 0  # sends so far (0: the request has left `pending` for none)
        self.written = False  # some attempt's write went out (the app may have read it)
        self.unwritten = False  # the last attempt's write failed at once (nothing left)
        self.sent_at = 0.0  # perf_counter at the last send

        self.responded = False  # a status line went to the client: no failover any more
        self.finished = False
        # Response bytes for the client, written once per upstream read (one syscall
        # for head and body of a small response).
        self.out: list[bytes] = []

    # --- the response's end -------------------------------------------------------------------

    def flush(self) -> None:
        """Write what the last upstream read produced for the client."""
        out = self.out
        if out:
            if len(out) == 1:
                self.client.write(out[0])
            elif len(out[-1]) < 8192:  # small: one copy is cheaper than a gathered write
                self.client.write(b"".join(out))
            else:
                self.client.writelines(out)
            out.clear()

    def on_response_complete(self, up: UpstreamProtocol,
                             trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.finished:
            return
        self.upstream = None
        if self.chunk_out:
            self.out.append(trailer_block(trailers))
        if up.keep_alive and self.body_done and not up.until_close and not self.upgrade:
            up.release(None if self.close_after else self.client)
        else:
            up.close()
        self._finish()

    # --- answering and ending -----------------------------------------------------------------

    def fail_client(self, err: ClientError) -> None:
        """The client's request turned out to be invalid mid-body: answer it and close."""
        self.keep_alive = False
        self._respond(err.status, err.reason, str(err) or err.reason.decode())

    def on_internal_error(self, exc: BaseException) -> None:
        self.ctx.metrics.internal_errors += 1
        log.error("internal_error", sid=self._sid(), exc_info=exc)
        self.keep_alive = False
        if self.finished:
            self.client.close()
            return
        self._respond(500, b"Internal Server Error", "internal proxy error")

    def _respond(self, status: int, reason: bytes, text: str,
                 extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """Answer with a response made by the proxy (or cut the connection if too late)."""
        if self.finished:
            return
        self._stop()
        if self.responded:
            self._abort_client()
            return
        self.out.clear()
        ctx = self.ctx
        close = not (self.keep_alive and self.body_done and not ctx.closing and not self.upgrade)
        self.client.write(simple_response(status, reason, text, close=close, extra=extra))
        self.responded = True
        self.close_after = close
        ctx.metrics.responses[status // 100] += 1
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        self.flush()
        self.client.exchange_done(self, not self.close_after)

    def _abort_client(self) -> None:
        self._stop()
        self.finished = True
        self.flush()
        self.client.close()

    def abort(self) -> None:
        """The client went away: stop everything, keep nothing half-used."""
        if not self.finished:
            self.finished = True
            self._stop()

    def _stop(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        up = self.upstream
        if up is not None:  # given up on before its response ended: reset (see `reset`)
            self.upstream = None
            reset(up)

    def _drop_upstream(self, up: UpstreamProtocol) -> None:
        if self.upstream is up:
            self.upstream = None
        reset(up)

    def _sid(self) -> str | None:
        return short(self.route.sid) if self.route is not None else None
