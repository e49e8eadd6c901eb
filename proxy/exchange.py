"""One request's journey: candidate backends in order, failover and retry, relaying the
response to the client (DESIGN.md section 2, steps 2-6).

Callback driven: a pooled connection is used synchronously; only opening a new one runs
a task. The request body is written through as it arrives and kept for replay while it
stays under `proxy.retry_body_max_bytes`.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
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
    UpstreamUnwritten,
)
from .headers import (
    parse_cluster_header,
    scan_response,
    simple_response,
    trailer_block,
)
from .policy import may_retry, may_retry_same
from .router import LATENCY_BOUNDS_S

if TYPE_CHECKING:
    from .client import ClientProtocol
    from .context import ProxyContext
    from .router import Backend
    from .upstream import UpstreamProtocol

__all__ = ["Exchange"]

log = structlog.get_logger("tandem.proxy")

_NO_BODY_STATUS = frozenset({204, 304})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_perf = time.perf_counter


class Exchange:
    """A request from a client, on its way to a backend and back."""

    __slots__ = (
        # set for every request (the fast lane's essentials)
        "client", "ctx", "method", "head", "route", "keep_alive", "http10", "upgrade",
        "kept", "pending",
        "body_done", "backend", "upstream", "attempts", "written", "unwritten", "sent_at",
        "responded", "finished", "out",
        # the rarely-set state below lives in a dict created on its first write
        "__dict__",
    )

    # Rarely-set state: class-level defaults, so that a request that needs none of it
    # (nearly all) pays nothing for it; an instance sets its own value when it must.
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
        # (the fast lane's essentials only; the general path sets the rarely-set flags
        # above on the new instance: keywords and their checks cost every request)
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
        if not body:
            transport.write(self.head + self.ctx.router.view_tail)
        elif len(body) == 1 and len(body[0]) < 16384:
            transport.write(b"%s%s%s" % (self.head, self.ctx.router.view_tail, body[0]))
        else:
            transport.writelines([self.head, self.ctx.router.view_tail, *body])
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

    # --- the response (from the upstream protocol) --------------------------------------------

    def on_response_head(self, up: UpstreamProtocol, status: int, reason: bytes,
                         raw: list[tuple[bytes, bytes]],
                         fast: tuple[bytes, bool] | None) -> None:
        if self.finished:
            return
        b = self.backend
        assert b is not None
        ctx = self.ctx
        if status == 503:
            ctx.router.mark_bad(b)
            if self.kept is not None and self._has_next():
                self._drop_upstream(up)
                self._failed(UpstreamUnavailable("answered 503", backend_id=b.id,
                                                 attempt=self.attempts))
                return
        elif status == 101 and not self.upgrade:
            self._drop_upstream(up)
            self._failed(UpstreamProtocolError("101 to a request without Upgrade",
                                               backend_id=b.id, attempt=self.attempts))
            return
        elapsed = _perf() - self.sent_at
        b.latency_counts[bisect_left(LATENCY_BOUNDS_S, elapsed)] += 1
        b.latency_sum_s += elapsed
        if b.bad_until and status != 503:  # a marked backend answered: it serves again
            ctx.router.seen_alive(b)
        if fast is not None:  # relayed verbatim: nothing to drop, no view piggy-backed
            parts = [fast[0]]
            has_length = fast[1]
            chunked = False
        else:
            rh = scan_response(raw)
            if rh.cluster is not None:
                self._apply_view(rh.cluster, declined=status == 503)
            parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason), *rh.lines]
            if status == 101 and rh.upgrade is not None:
                parts += (b"Connection: Upgrade\r\nUpgrade: ", rh.upgrade, b"\r\n")
            has_length = rh.content_length is not None
            chunked = rh.chunked
        if status != 101:
            if self.method == b"HEAD" or status in _NO_BODY_STATUS:
                if chunked and not self.http10:
                    parts.append(_CHUNKED)
            elif not has_length:
                up.until_close = not chunked
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
        self.out.append(b"".join(parts))
        self.responded = True
        ctx.metrics.responses[status // 100] += 1

    def relay_whole(self, up: UpstreamProtocol, data: bytes, end: int) -> None:
        """The fast lane of responses: `data` is one whole response (head ending at `end`,
        Content-Length body) with nothing to rewrite, relayed as read, in one write."""
        if self.finished:
            return
        ctx = self.ctx
        b = self.backend
        assert b is not None
        elapsed = _perf() - self.sent_at
        b.latency_counts[bisect_left(LATENCY_BOUNDS_S, elapsed)] += 1
        b.latency_sum_s += elapsed
        if b.bad_until:  # a marked backend answered (never 503 here): it serves again
            ctx.router.seen_alive(b)
        ctx.metrics.responses[data[9] - 48] += 1  # (the status's first digit, in ASCII)
        self.upstream = None
        self.responded = self.finished = True
        client = self.client
        if (self.keep_alive and self.body_done and not self.upgrade and not self.http10
                and not ctx.closing and not self.out):
            # The common case (a keep-alive HTTP/1.1 request, read whole): as is. The
            # backend connection stays with the client's for its next request.
            up.release(client)
            client.write(data)
            client.exchange_done(self, True)
            return
        if self.body_done and not self.upgrade:
            up.release()
        else:
            up.close()
        if not self.keep_alive or ctx.closing or self.upgrade or not self.body_done:
            self.close_after = True
            data = b"%s%s%s" % (data[:end + 2], b"Connection: close\r\n", data[end + 2:])
        elif self.http10:
            data = b"%s%s%s" % (data[:end + 2], b"Connection: keep-alive\r\n", data[end + 2:])
        out = self.out
        if out:
            out.append(data)
            self.flush()
        else:
            client.write(data)
        client.exchange_done(self, not self.close_after)

    def on_response_body(self, data: bytes) -> None:
        if self.finished or not data:
            return
        if self.chunk_out:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

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

    def on_upgrade(self, up: UpstreamProtocol, rest: bytes) -> None:
        """The backend switched protocols (101): from now on bytes pass through raw."""
        if self.finished or not self.responded or self.upstream is not up:
            up.abort()
            return
        self.upstream = None
        up.exchange = None
        self.finished = True
        self.flush()
        self.ctx.metrics.upgrades += 1
        self.client.start_tunnel(self, up, rest)

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
        if up is not None:
            self.upstream = None
            up.close()

    def _drop_upstream(self, up: UpstreamProtocol) -> None:
        if self.upstream is up:
            self.upstream = None
        up.abort()

    def _apply_view(self, value: bytes, *, declined: bool) -> None:
        """Adopt a cluster view piggy-backed on a response (`declined`: that response was a
        503, so its sender is not cleared of its bad mark, whatever the view says)."""
        router = self.ctx.router
        try:
            view_hash, members = parse_cluster_header(value.decode("latin-1"))
        except ValueError as exc:
            log.warning("bad_cluster_header", backend=self.backend.id if self.backend else None,
                        error=str(exc))
            return
        if view_hash == router.view_hash:
            return
        was_in = [b for b in router.backends if b.in_view]
        added = router.apply_view(view_hash, members,
                                  declined=self.backend if declined else None)
        if any(not b.in_view for b in was_in):
            # requests waiting at a server that left the view fail over now (check_io)
            self.ctx.loop.call_soon(self.ctx.check_io_all)
        self.ctx.metrics.views_applied += 1
        log.info("view_updated", view=view_hash, members=sorted(members), added=added)

    def _sid(self) -> str | None:
        return short(self.route.sid) if self.route is not None else None
