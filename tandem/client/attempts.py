"""The attempts of one logical request: which server next, what a failure means, when to
stop. Library-free; the httpx transports and the requests adapter drive it:

    attempts = Attempts(cluster, method=..., route=..., replayable=...)
    for target in attempts:
        try: response = send(target)            # with attempts.headers()
        except <connect / after-send error> as exc:
            if attempts.failed(target, Failure.X, exc): continue
            raise                                # not retried: the library's error
        if response is a 503 and attempts.declined(target, state): continue
        attempts.answered(target, cluster_header, status); return response
    raise NoServerAvailable(attempts.exhausted(), ...)
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import structlog

from tandem.logs import short
from tandem.token import Route
from tandem.view import VIEW_HEADER

from .cluster import Cluster, Target
from .policy import SESSION_STATES, Failure, may_retry

__all__ = ["Attempts", "REQUEST_ID_HEADER", "new_request_id"]

REQUEST_ID_HEADER = "X-Tandem-Request-Id"

log = structlog.get_logger("tandem.client")


def new_request_id() -> str:
    """16 url-safe characters (96 random bits): one per logical request, the same on each
    of its retries, so that a backend applies a retried request once."""
    return secrets.token_urlsafe(12)


class Attempts:
    """Iterates the candidate servers of one request until one answers or the rules stop."""

    __slots__ = ("cluster", "method", "route", "replayable", "request_id", "_targets",
                 "_next", "_sent", "tried", "last_error", "_go_on", "maybe_applied")

    def __init__(self, cluster: Cluster, *, method: str, route: Route | None,
                 replayable: bool, request_id: str | None = None) -> None:
        # the request
        self.cluster = cluster
        self.method = method.upper()
        self.route = route
        self.replayable = replayable
        self.request_id = request_id or new_request_id()
        # its progress
        self._targets = cluster.candidates(route)
        self._next = 0
        self._sent = False  # an earlier attempt wrote (some of) the request
        self._go_on = True
        self.tried: list[str] = []
        self.last_error: BaseException | None = None
        self.maybe_applied = False  # an attempt failed after sending: the last one may count

    def headers(self) -> dict[str, str]:
        """The headers every attempt carries: the request id and the view the client knows."""
        return {REQUEST_ID_HEADER: self.request_id, VIEW_HEADER: self.cluster.view}

    def __iter__(self) -> Iterator[Target]:
        while self._go_on and self._next < len(self._targets):
            target = self._targets[self._next]
            self._next += 1
            self.tried.append(target.name)
            yield target

    @property
    def has_next(self) -> bool:
        return self._next < len(self._targets)

    def failed(self, target: Target, failure: Failure, exc: BaseException) -> bool:
        """`target` failed the request: True to try the next candidate; False when the
        rules forbid it (the caller re-raises `exc`, which then carries a note why)."""
        self.last_error = exc
        if failure.marks_bad:
            self.cluster.mark_bad(target)
        allowed = may_retry(failure, method=self.method, retry=self.cluster.retry,
                            replayable=self.replayable, sent_before=self._sent)
        self._sent = self._sent or not failure.nothing_sent
        self.maybe_applied = not failure.nothing_sent
        sid = short(self.route.sid) if self.route else None
        if not allowed:
            self._go_on = False
            why = ("its body was a stream, already consumed" if not self.replayable
                   else f"{self.method} is not idempotent (retry={self.cluster.retry!r})"
                   if self.cluster.retry != "none" else "retry='none'")
            log.warning("client_not_retried", sid=sid, server=target.name,
                        cause=failure.value, method=self.method)
            exc.add_note(f"tandem.client: not retried on another server after "
                         f"{failure.value} at {target.name}: the request may have been "
                         f"applied, and {why}")
            return False
        if self.has_next:
            log.info("client_failover", sid=sid, from_=target.name,
                     to=self._targets[self._next].name, cause=failure.value,
                     after_send=not failure.nothing_sent)
        return True

    def declined(self, target: Target, state: str | None) -> bool:
        """`target` answered 503 (`state`: its X-Tandem-State). True: discard the response
        and try the next candidate; False: hand the 503 to the caller (no candidate left,
        or the body cannot be sent again)."""
        if (state or "").strip().lower() not in SESSION_STATES:
            self.cluster.mark_bad(target)  # the whole server declines (draining, no lease)
        if not self.has_next:
            return False
        allowed = may_retry(Failure.DECLINED, method=self.method, retry=self.cluster.retry,
                            replayable=self.replayable, sent_before=self._sent)
        self._sent = True
        if allowed:
            log.info("client_failover", sid=short(self.route.sid) if self.route else None,
                     from_=target.name, to=self._targets[self._next].name, cause="503",
                     state=state)
        return allowed

    def answered(self, target: Target, *, status: int, cluster_header: str | None) -> None:
        """`target` answered: clear its bad mark (unless it declined), learn the view."""
        if status != 503:
            self.cluster.seen_alive(target)
        if cluster_header is not None:
            self.cluster.learn(cluster_header, declined=target if status == 503 else None)

    def exhausted(self) -> str:
        """The message when every candidate failed (the caller raises `last_error` instead
        when `maybe_applied`: the last attempt failed after sending)."""
        tried = ", ".join(self.tried) or "none"
        return (f"no server of the cluster could take {self.method} (tried {tried}); "
                f"last error: {self.last_error}")
