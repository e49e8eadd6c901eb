"""One request's journey: candidate backends in order, failover and retry, relaying the
response to the client (DESIGN.md section 2, steps 2-6).

Callback driven: a pooled connection is used synchronously; only opening a new one runs
a task. The request body is written through as it arrives and kept for replay while it
stays under `proxy.retry_body_max_bytes`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from backends.logs import short
from backends.token import Route

from .errors import (
    ClientError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResetAfterSend,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from .headers import parse_cluster_header, scan_response, simple_response, trailer_block

if TYPE_CHECKING:
    from .client import ClientProtocol
    from .context import ProxyContext
    from .router import Backend
    from .upstream import UpstreamProtocol

__all__ = ["Exchange", "IDEMPOTENT"]

log = structlog.get_logger("tandem.proxy")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_perf = time.perf_counter


class Exchange:
    """A request from a client, on its way to a backend and back."""

    __slots__ = (
        # request (fixed)
        "client", "ctx", "method", "head", "route", "keep_alive", "http10", "upgrade",
        "expect_continue", "chunked_in",
        # request body
        "kept", "kept_bytes", "pending", "pending_bytes", "body_bytes", "body_done",
        # attempts
        "candidates", "next_index", "backend", "upstream", "attempts", "sent_any",
        "stale_retried", "connecting", "timer", "timer_mark", "sent_at", "last_error",
        # response
        "responded", "continue_sent", "chunk_out", "close_after", "finished",
    )

    def __init__(self, client: ClientProtocol, ctx: ProxyContext, *, method: bytes, head: bytes,
                 route: Route | None, keep_alive: bool, http10: bool, upgrade: bool,
                 expect_continue: bool, chunked: bool) -> None:
        self.client = client
        self.ctx = ctx
        self.method = method
        self.head = head  # upstream request head without X-Tandem-View and the last CRLF
        self.route = route
        self.keep_alive = keep_alive  # the client wants the connection kept
        self.http10 = http10
        self.upgrade = upgrade
        self.expect_continue = expect_continue
        self.chunked_in = chunked

        self.kept: list[bytes] | None = []  # the body so far, framed; None: too big to replay
        self.kept_bytes = 0
        self.pending: list[bytes] = []  # framed body not yet written to an upstream
        self.pending_bytes = 0
        self.body_bytes = 0
        self.body_done = False

        self.candidates: list[Backend] = []
        self.next_index = 0
        self.backend: Backend | None = None
        self.upstream: UpstreamProtocol | None = None
        self.attempts = 0
        self.sent_any = False  # some attempt wrote the head to a backend
        self.stale_retried = False
        self.connecting: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_mark = 0
        self.sent_at = 0.0
        self.last_error: UpstreamError | None = None

        self.responded = False  # a status line went to the client: no failover any more
        self.continue_sent = False
        self.chunk_out = False
        self.close_after = False
        self.finished = False

    # --- choosing and sending -----------------------------------------------------------------

    def start(self) -> None:
        self.candidates = self.ctx.router.candidates(self.route)
        self._dispatch()

    def _dispatch(self) -> None:
        candidates = self.candidates
        if self.next_index < len(candidates):
            b = candidates[self.next_index]
            self.next_index += 1
            self.backend = b
            up = b.pool.take()
            if up is not None:
                self._send(b, up)
            else:
                self.connecting = self.ctx.loop.create_task(self._connect(b))
            return
        self._no_backend()

    async def _connect(self, b: Backend) -> None:
        try:
            try:
                up = await b.pool.connect()
            except UpstreamConnectError as exc:
                self.connecting = None
                if not self.finished:
                    exc.attempt = self.attempts + 1
                    self._failed(exc)
                return
            self.connecting = None
            if self.finished:
                b.pool.put(up)
                return
            self._send(b, up)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: answer once, never leave the client hanging
            self.on_internal_error(exc)

    def _send(self, b: Backend, up: UpstreamProtocol) -> None:
        client = self.client
        self.upstream = up
        up.attach(self, head_only=self.method == b"HEAD", pause_reading=client.write_paused)
        self.attempts += 1
        b.routed += 1
        if (self.expect_continue and not self.continue_sent and self.body_bytes == 0
                and not self.body_done):
            self.continue_sent = True
            client.write(_CONTINUE)
        head = self.head + self.ctx.router.view_tail
        body = self.pending
        if self.sent_any:
            assert self.kept is not None  # checked by _may_retry
            body = self.kept
        transport = up.transport
        assert transport is not None
        if not body:
            transport.write(head)
        elif len(body) == 1 and len(body[0]) < 16384:
            transport.write(head + body[0])
        else:
            transport.writelines([head, *body])
        if self.pending:
            self.pending = []
            self.pending_bytes = 0
            client.resume_reading_pending()
        self.sent_any = True
        self.sent_at = _perf()
        self._arm_timer(up)

    # --- the request body (from the client protocol) ------------------------------------------

    def feed_body(self, wire: bytes) -> None:
        """Framed request body bytes (a chunk with its size line when chunked)."""
        if self.finished:
            return
        self.body_bytes += len(wire)
        kept = self.kept
        if kept is not None:
            kept.append(wire)
            self.kept_bytes += len(wire)
            if self.kept_bytes > self.ctx.retry_body_max:
                self.kept = None
        up = self.upstream
        if up is not None:
            up.activity += 1
            transport = up.transport
            assert transport is not None
            transport.write(wire)
        else:
            self.pending.append(wire)
            self.pending_bytes += len(wire)
            if self.pending_bytes > self.ctx.pending_max:
                self.client.pause_reading_pending()

    def feed_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        """The request message is complete (trailers only for chunked bodies)."""
        if self.chunked_in:
            self.feed_body(trailer_block(trailers))
        self.body_done = True

    def upstream_pause_writing(self) -> None:
        self.client.pause_reading_upstream()

    def upstream_resume_writing(self) -> None:
        self.client.resume_reading_upstream()

    # --- the response (from the upstream protocol) --------------------------------------------

    def on_response_head(self, up: UpstreamProtocol, status: int, reason: bytes,
                         raw: list[tuple[bytes, bytes]]) -> None:
        if self.finished:
            return
        b = self.backend
        assert b is not None
        ctx = self.ctx
        if status == 503:
            ctx.router.mark_bad(b)
            if self.kept is not None and self.next_index < len(self.candidates):
                self._drop_upstream(up)
                self._failed(UpstreamUnavailable("answered 503", backend_id=b.id,
                                                 attempt=self.attempts))
                return
        elif status == 101 and not self.upgrade:
            self._drop_upstream(up)
            self._failed(UpstreamProtocolError("101 to a request without Upgrade",
                                               backend_id=b.id, attempt=self.attempts))
            return
        b.observe_latency(_perf() - self.sent_at)
        rh = scan_response(raw)
        if rh.cluster is not None:
            self._apply_view(rh.cluster)
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason), *rh.lines]
        if status == 101:
            if rh.upgrade is not None:
                parts += (b"Connection: Upgrade\r\nUpgrade: ", rh.upgrade, b"\r\n")
        else:
            if self.method == b"HEAD" or status in _NO_BODY_STATUS:
                if rh.chunked and not self.http10:
                    parts.append(_CHUNKED)
            elif rh.content_length is None:
                up.until_close = not rh.chunked
                if self.http10:
                    self.close_after = True  # no chunked for HTTP/1.0: close-delimited
                else:
                    self.chunk_out = True
                    parts.append(_CHUNKED)
            if (not self.keep_alive or self.close_after or ctx.closing or self.upgrade
                    or not self.body_done):
                self.close_after = True
                parts.append(b"Connection: close\r\n")
            elif self.http10:
                parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.client.write(b"".join(parts))
        self.responded = True
        ctx.metrics.responses[status // 100] += 1

    def on_response_body(self, data: bytes) -> None:
        if self.finished or not data:
            return
        if self.chunk_out:
            self.client.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.client.write(data)

    def on_response_complete(self, up: UpstreamProtocol,
                             trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.finished:
            return
        self._cancel_timer()
        self.upstream = None
        if self.chunk_out:
            self.client.write(trailer_block(trailers))
        if up.keep_alive and self.body_done and not up.until_close and not self.upgrade:
            up.release()
        else:
            up.close()
        self._finish()

    def on_upgrade(self, up: UpstreamProtocol, rest: bytes) -> None:
        """The backend switched protocols (101): from now on bytes pass through raw."""
        if self.finished or not self.responded or self.upstream is not up:
            up.abort()
            return
        self._cancel_timer()
        self.upstream = None
        up.exchange = None
        self.finished = True
        self.ctx.metrics.upgrades += 1
        self.client.start_tunnel(self, up, rest)

    # --- failures -----------------------------------------------------------------------------

    def on_upstream_lost(self, up: UpstreamProtocol, exc: Exception | None) -> None:
        if self.finished:
            return
        self._cancel_timer()
        self.upstream = None
        b = self.backend
        assert b is not None
        if self.responded:
            if up.until_close and exc is None:
                self.on_response_complete(up, None)  # close-delimited body: EOF ends it
            else:
                b.io_errors += 1
                log.warning("upstream_truncated", backend=b.id, sid=self._sid())
                self._abort_client()
            return
        if (up.requests > 0 and not up.got_bytes and not self.stale_retried
                and self.kept is not None
                and (self.method in IDEMPOTENT or self.ctx.retry == "all")):
            # A reused keep-alive connection the backend had already closed: the request
            # never reached the application. Same backend, fresh connection, once.
            self.stale_retried = True
            self.ctx.metrics.stale_retries += 1
            b.pool.clear_idle()
            self.connecting = self.ctx.loop.create_task(self._connect(b))
            return
        b.io_errors += 1
        self._failed(UpstreamResetAfterSend("connection closed before a response",
                                            backend_id=b.id, attempt=self.attempts))

    def on_bad_response(self, up: UpstreamProtocol, exc: Exception) -> None:
        self._drop_upstream(up)
        if self.finished:
            return
        b = self.backend
        assert b is not None
        b.io_errors += 1
        if self.responded:
            log.warning("upstream_bad_response", backend=b.id, error=str(exc), sid=self._sid())
            self._abort_client()
            return
        self._failed(UpstreamProtocolError(f"invalid response: {exc}", backend_id=b.id,
                                           attempt=self.attempts))

    def _failed(self, exc: UpstreamError) -> None:
        """One backend could not complete the request: fail over, or answer."""
        ctx = self.ctx
        b = self.backend
        assert b is not None
        self.last_error = exc
        if isinstance(exc, UpstreamConnectError):
            b.connect_errors += 1
        if exc.marks_bad:
            ctx.router.mark_bad(b)
        if not self._may_retry(exc):
            log.warning("upstream_failed", sid=self._sid(), backend=b.id, cause=exc.cause,
                        method=self.method.decode("latin-1"), error=str(exc))
            self._respond(502, b"Bad Gateway", f"bad gateway: {exc}")
            return
        if self.next_index >= len(self.candidates):
            self._no_backend()
            return
        to = self.candidates[self.next_index].id
        b.failovers += 1
        ctx.metrics.count_failover(exc.cause)
        if not exc.nothing_sent:
            ctx.metrics.retries += 1
        log.info("failover", sid=self._sid(), from_=b.id, to=to, cause=exc.cause)
        self._dispatch()

    def _may_retry(self, exc: UpstreamError) -> bool:
        if exc.nothing_sent and not self.sent_any:
            return True
        if self.kept is None:  # body too large to replay: it is gone
            return False
        if exc.nothing_sent or not exc.method_sensitive:
            return True
        retry = self.ctx.retry
        return retry == "all" or (retry == "idempotent" and self.method in IDEMPOTENT)

    def _no_backend(self) -> None:
        err = self.last_error
        if err is not None and err.method_sensitive:
            self._respond(502, b"Bad Gateway", f"bad gateway: {err}")
            return
        ctx = self.ctx
        ctx.metrics.no_backend += 1
        log.warning("no_backend", sid=self._sid(), tried=[b.id for b in self.candidates])
        self._respond(503, b"Service Unavailable",
                      "no backend server is available to handle this request; retry later",
                      extra=((b"Retry-After", ctx.retry_after),))

    def _arm_timer(self, up: UpstreamProtocol) -> None:
        self.timer_mark = up.activity
        self.timer = self.ctx.loop.call_later(self.ctx.io_timeout_s, self._on_timer)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        up = self.upstream
        if up is None or self.finished:
            return
        if up.activity != self.timer_mark:  # something moved: give it a whole period again
            self._arm_timer(up)
            return
        try:
            b = self.backend
            assert b is not None
            if up.reading_paused:  # the client has not read for io_timeout_s
                log.info("client_stalled", backend=b.id, sid=self._sid())
                self._drop_upstream(up)
                self._abort_client()
            elif not self.body_done and not up.writing_paused:  # client stopped sending
                log.info("client_stalled", backend=b.id, sid=self._sid())
                self.keep_alive = False
                self._respond(408, b"Request Timeout", "request body not received in time")
            else:
                b.io_errors += 1
                self._drop_upstream(up)
                exc = UpstreamTimeout(f"no response data for {self.ctx.io_timeout_s}s",
                                      backend_id=b.id, attempt=self.attempts)
                if self.responded:
                    self.ctx.router.mark_bad(b)
                    log.warning("upstream_timeout", backend=b.id, sid=self._sid())
                    self._abort_client()
                else:
                    self._failed(exc)
        except Exception as exc:
            self.on_internal_error(exc)

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
        ctx = self.ctx
        close = not (self.keep_alive and self.body_done and not ctx.closing and not self.upgrade)
        self.client.write(simple_response(status, reason, text, close=close, extra=extra))
        self.responded = True
        self.close_after = close
        ctx.metrics.responses[status // 100] += 1
        self._finish()

    def _finish(self) -> None:
        self.finished = True
        self.client.exchange_done(self, keep=not self.close_after)

    def _abort_client(self) -> None:
        self._stop()
        self.finished = True
        self.client.close()

    def abort(self) -> None:
        """The client went away: stop everything, keep nothing half-used."""
        if not self.finished:
            self.finished = True
            self._stop()

    def _stop(self) -> None:
        self._cancel_timer()
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.close()

    def _drop_upstream(self, up: UpstreamProtocol) -> None:
        self._cancel_timer()
        if self.upstream is up:
            self.upstream = None
        up.abort()

    def _apply_view(self, value: bytes) -> None:
        router = self.ctx.router
        try:
            view_hash, members = parse_cluster_header(value.decode("latin-1"))
        except ValueError as exc:
            log.warning("bad_cluster_header", backend=self.backend.id if self.backend else None,
                        error=str(exc))
            return
        if view_hash == router.view_hash:
            return
        added = router.apply_view(view_hash, members)
        self.ctx.metrics.views_applied += 1
        log.info("view_updated", view=view_hash, members=sorted(members), added=added)

    def _sid(self) -> str | None:
        return short(self.route.sid) if self.route is not None else None
