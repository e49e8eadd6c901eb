"""One request's journey: a request from a client on its way to a backend and back —
and, here, the last stage: relaying the response to the client.

An `Exchange` is assembled in stages, one module each, in the order of a request's life:
`ExchangeState` (proxy/exchange_state.py: what it holds, how it ends), `Attempts`
(proxy/attempts.py: choosing a backend, sending, retry and failover) and `Exchange`
(here). A response comes in two ways from the response pipeline (proxy/responses.py):
whole and as read (`relay_whole`: layers 1-3), or parsed, head first (`on_response_head`,
then body and end: layer 3's lean parser and the general path).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING

import structlog

from .attempts import Attempts
from .errors import UpstreamProtocolError, UpstreamUnavailable
from .headers import parse_cluster_header, scan_response
from .router import LATENCY_BOUNDS_S

if TYPE_CHECKING:
    from .upstream import UpstreamProtocol

__all__ = ["Exchange"]

log = structlog.get_logger("tandem.proxy")

_NO_BODY_STATUS = frozenset({204, 304})
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_perf = time.perf_counter


class Exchange(Attempts):
    """A request from a client, on its way to a backend and back."""

    __slots__ = ()

    # --- the response (from the response pipeline) --------------------------------------------

    def on_response_head(self, up: UpstreamProtocol, status: int, reason: bytes,
                         raw: list[tuple[bytes, bytes]],
                         fast: tuple[bytes, bool] | None) -> None:
        if self.finished:
            return
        b = self.backend
        assert b is not None
        ctx = self.ctx
        if status == 503:
            if _server_wide(raw):  # (not for one session's trouble: its server serves others)
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
        """Where layers 1-3 of the response pipeline end: `data` is one whole response
        (head ending at `end`, Content-Length body) with nothing to rewrite, no 1xx, 101,
        204, 304 or 503, relayed as read, in one write."""
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
        if not router.is_newer(view_hash):
            return  # the same, or an older one (a server in a minority knows no newer)
        was_in = [b for b in router.backends if b.in_view]
        added = router.apply_view(view_hash, members,
                                  declined=self.backend if declined else None)
        if any(not b.in_view for b in was_in):
            # requests waiting at a server that left the view fail over now (check_io)
            self.ctx.loop.call_soon(self.ctx.check_io_all)
        self.ctx.metrics.views_applied += 1
        log.info("view_updated", view=view_hash, members=sorted(members), added=added)


# X-Tandem-State of a 503 that concerns one session, not its server: the server keeps its
# place (no skip mark); the request still fails over to the next candidate. (`memory-budget`:
# the server takes no new session, and keeps serving its own; `store-unavailable`: this
# session is in the store only, which fails.)
_SESSION_STATES = frozenset({b"unprotected", b"owner-unreachable", b"late", b"memory-budget",
                             b"store-unavailable"})


def _server_wide(raw: list[tuple[bytes, bytes]]) -> bool:
    """Is this 503 about the whole server (draining, no lease, fenced, ...)?"""
    for name, value in raw:
        if len(name) == 14 and name.lower() == b"x-tandem-state":
            return value.strip().lower() not in _SESSION_STATES
    return True
