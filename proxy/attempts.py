"""A request's attempts: choosing a backend, sending the request (its body as it
arrives), and what a failure leads to — once more on the same backend, failover to the
next candidate, or an answer from the proxy (502, 503) — and the io watch.

Callback driven: a pooled connection is used synchronously; only opening a new one runs
a task. The request body is written through as it arrives and kept for replay while it
stays under `proxy.retry_body_max_bytes`. Every attempt carries `X-Tandem-Deadline`, the
least the proxy will wait for its response, and a connection given up on is reset (see
`exchange_state.reset`): a backend never applies a request the proxy has answered for it
(docs/consistency.md, I7). The second stage of an `Exchange` (see proxy/exchange_state.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from .errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResetAfterSend,
    UpstreamTimeout,
    UpstreamUnwritten,
)
from .exchange_state import ExchangeState
from .policy import may_retry, may_retry_same

if TYPE_CHECKING:
    from .router import Backend
    from .upstream import UpstreamProtocol

__all__ = ["Attempts", "DEADLINE_HEADER", "deadline_field"]

log = structlog.get_logger("tandem.proxy")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_perf = time.perf_counter

DEADLINE_HEADER = b"X-Tandem-Deadline"
_DEADLINES: dict[float, bytes] = {}  # io timeout (s) -> its header line, made once


def deadline_field(io_timeout_s: float) -> bytes:
    """The `X-Tandem-Deadline` line of every attempt: the milliseconds the proxy waits at
    least for the attempt's response unless it resets the connection first — its io
    timeout, which check_io counts from a look after the last write (docs/consistency.md,
    I7)."""
    line = _DEADLINES.get(io_timeout_s)
    if line is None:
        ms = max(1, int(io_timeout_s * 1000))  # rounded down: never more than we wait
        line = _DEADLINES[io_timeout_s] = b"%s: %d\r\n" % (DEADLINE_HEADER, ms)
    return line


class Attempts(ExchangeState):
    """An exchange's way to a backend: sending, retrying, failing over."""

    __slots__ = ()

    # --- choosing and sending -----------------------------------------------------------------

    def start(self) -> None:
        b = self.ctx.router.first(self.route)
        if b is None:
            self._dispatch()
            return
        self._try(b)

    def _remaining(self) -> list[Backend]:
        """Candidates not tried yet, in order (the full order is computed only when the
        obvious first choice did not do)."""
        if self.candidates is None:
            tried = self.backend
            self.candidates = [b for b in self.ctx.router.candidates(self.route)
                               if b is not tried]
        return self.candidates

    def _has_next(self) -> bool:
        return self.next_index < len(self._remaining())

    def _dispatch(self) -> None:
        candidates = self._remaining()
        if self.next_index < len(candidates):
            b = candidates[self.next_index]
            self.next_index += 1
            self._try(b)
            return
        self._no_backend()

    def _try(self, b: Backend) -> None:
        """Send to `b`: on the client connection's own upstream connection when it goes
        there (see ClientProtocol.own_upstream), else a pooled one, else a new one."""
        self.backend = b
        client = self.client
        up = client.own_upstream
        if up is not None:
            client.own_upstream = None
            transport = up.transport
            if up.pool is not b.pool:  # another backend's: back to its pool
                up.pool.put(up)
                up = b.pool.take()
            elif transport is None or transport.is_closing():  # closed while kept
                up = b.pool.take()
        else:
            up = b.pool.take()
        if up is not None:
            self._send(b, up)
        else:
            self.connecting = self.ctx.loop.create_task(self._connect(b))

    async def _connect(self, b: Backend) -> None:
        try:
            try:
                up = await b.pool.connect()
            except UpstreamConnectError as exc:
                self.connecting = None
                if not self.finished:
                    exc.attempt = self.attempts + 1
                    cause, self.retry_cause = self.retry_cause, None
                    if cause is not None:  # the fresh connection of a retry on b
                        b.connect_errors += 1
                        self.ctx.router.mark_bad(b)
                        self._failed(cause)
                    else:
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
        # (UpstreamProtocol.attach, inlined: a call less per request)
        up.exchange = self
        up.head_only = self.method == b"HEAD"
        up.got_bytes = up.until_close = False
        if client.write_paused:
            up.pause_reading()
        attempts = self.attempts
        self.attempts = attempts + 1
        b.routed += 1
        if attempts:  # a retry or a failover: the body goes out again from `kept`
            body = self.kept
            self.retry_cause = None
            if self.written:
                self.ctx.metrics.retries += 1  # the request goes out again after a failure
            # io timeout watch (see check_io): its first look starts the quiet period.
            self.timer_mark = -1
            self.quiet_since = 0.0
        else:
            body = self.pending
        if (not self.body_done and self.expect_continue and not self.continue_sent
                and self.body_bytes == 0):  # (slots first: the others are rarely set)
            self.continue_sent = True
            client.write(_CONTINUE)
        transport = up.transport
        assert transport is not None
        ctx = self.ctx
        deadline = _DEADLINES.get(ctx.io_timeout_s) or deadline_field(ctx.io_timeout_s)
        if not body:
            transport.write(self.head + deadline + ctx.router.view_tail)
        elif len(body) == 1 and len(body[0]) < 16384:
            transport.write(b"%s%s%s%s" % (self.head, deadline, ctx.router.view_tail, body[0]))
        else:
            transport.writelines([self.head, deadline, ctx.router.view_tail, *body])
        if self.pending:
            self.pending = []
            self.pending_bytes = 0
            client.resume_reading_pending()
        # A write that fails at once closes the transport there and then: no byte of the
        # request left (a pooled connection that died unnoticed); see on_upstream_lost.
        if transport.is_closing():
            self.unwritten = True
        else:
            self.unwritten = False
            self.written = True
        self.sent_at = _perf()

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

    def upstream_pause_writing(self) -> None:
        self.client.pause_reading_upstream()

    def upstream_resume_writing(self) -> None:
        self.client.resume_reading_upstream()

    # --- failures -----------------------------------------------------------------------------

    def on_upstream_lost(self, up: UpstreamProtocol, exc: Exception | None) -> None:
        if self.finished:
            return
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
        b.io_errors += 1
        # Classified by what may have reached the application: nothing when the write
        # itself failed; otherwise the request may have been read (and acted on) even if
        # no response byte came back.
        if self.unwritten:
            err: UpstreamError = UpstreamUnwritten(
                "connection closed before the request could be written", backend_id=b.id,
                attempt=self.attempts)
        else:
            err = UpstreamResetAfterSend("connection closed before a response",
                                         backend_id=b.id, attempt=self.attempts)
        ctx = self.ctx
        if may_retry_same(err, method=self.method, policy=ctx.retry,
                          replayable=self.kept is not None, reused=up.requests > 0,
                          already=self.retried_same):
            # A dead keep-alive connection: the backend most likely closed it while idle.
            # Once more on a fresh connection to the same backend (affinity kept), then
            # the failover rules. Counted as a retry when re-sent after a write.
            self.retried_same = True
            if not err.nothing_sent:
                self.retry_cause = err
            ctx.metrics.stale_retries += 1
            log.info("retry", sid=self._sid(), backend=b.id, cause=err.cause,
                     reused=up.requests > 0)
            b.pool.clear_idle()
            self.connecting = ctx.loop.create_task(self._connect(b))
            return
        self._failed(err)

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
        if not may_retry(exc, method=self.method, policy=ctx.retry,
                         replayable=self.kept is not None, sent_before=self.attempts > 0):
            log.warning("upstream_failed", sid=self._sid(), backend=b.id, cause=exc.cause,
                        method=self.method.decode("latin-1"), error=str(exc))
            self._respond(502, b"Bad Gateway", f"bad gateway: {exc}")
            return
        if not self._has_next():
            self._no_backend()
            return
        to = self._remaining()[self.next_index].id
        b.failovers += 1
        ctx.metrics.count_failover(exc.cause)
        log.info("failover", sid=self._sid(), from_=b.id, to=to, cause=exc.cause,
                 after_send=self.written)
        self._dispatch()

    def _no_backend(self) -> None:
        err = self.last_error
        if err is not None and err.method_sensitive:
            self._respond(502, b"Bad Gateway", f"bad gateway: {err}")
            return
        ctx = self.ctx
        ctx.metrics.no_backend += 1
        tried = [b.id for b in self.candidates or ()]
        if self.backend is not None and self.backend.id not in tried:
            tried.insert(0, self.backend.id)
        log.warning("no_backend", sid=self._sid(), tried=tried)
        self._respond(503, b"Service Unavailable",
                      "no backend server is available to handle this request; retry later",
                      extra=((b"Retry-After", ctx.retry_after),))

    def check_io(self, now: float) -> None:
        """Called about every io_timeout_s / 4 (at most 1 s) for the exchange a client
        connection is answering: enforce proxy.io_timeout_s (counted from the first call
        that sees no activity: no clock read per request)."""
        up = self.upstream
        if up is None or self.finished:
            return
        if up.activity != self.timer_mark:  # something moved since the last look
            self.timer_mark = up.activity
            self.quiet_since = now
            return
        b = self.backend
        assert b is not None
        quiet = now - self.quiet_since
        try:
            if quiet < self.ctx.io_timeout_s:
                # The cluster reports the server failed (missed heartbeats: hung, or cut
                # off), or the active probes found it unhealthy, and it is silent while we
                # wait for its response: no need to wait for the io timeout to fail over.
                if ((b.in_view and b.healthy) or quiet < self.ctx.view_quiet_s
                        or self.responded or not self.body_done or up.writing_paused):
                    return
                self._no_response(b, up, f"no response data, and the cluster reports "
                                          f"{b.id} failed")
            elif up.reading_paused:  # the client has not read for io_timeout_s
                log.info("client_stalled", backend=b.id, sid=self._sid())
                self._drop_upstream(up)
                self._abort_client()
            elif not self.body_done and not up.writing_paused:  # client stopped sending
                log.info("client_stalled", backend=b.id, sid=self._sid())
                self.keep_alive = False
                self._respond(408, b"Request Timeout", "request body not received in time")
            else:
                self._no_response(b, up, f"no response data for {self.ctx.io_timeout_s}s")
        except Exception as exc:
            self.on_internal_error(exc)

    def _no_response(self, b: Backend, up: UpstreamProtocol, reason: str) -> None:
        """Give up on `b` for this request: fail over, or cut a response begun."""
        b.io_errors += 1
        self._drop_upstream(up)
        if self.responded:
            self.ctx.router.mark_bad(b)
            log.warning("upstream_timeout", backend=b.id, sid=self._sid())
            self._abort_client()
        else:
            self._failed(UpstreamTimeout(reason, backend_id=b.id, attempt=self.attempts))

