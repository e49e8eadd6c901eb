"""A proxied request's deadline: the backend's side of invariant I7 — a request the proxy
has given up on is never applied later (docs/consistency.md).

The proxy sends every attempt with `X-Tandem-Deadline: <ms>`, the least it will wait for
that attempt's response, counted from its last write of the request, and resets a
connection it gives up on. No two clocks are compared: the backend measures, on its own
monotonic clock, from the read that brought the request's latest bytes (its head, or the
end of its body). A request is *missed* when

- that time is older than the budget (shortened by the clock-rate margin `1 + 2ρ`): the
  proxy wrote those bytes before we read them, so it has given up already (or is about
  to) — a stall here after the read: a SIGSTOP, a blocked loop, a queue, a slow app; or
- the proxy has closed or reset the connection: it never leaves a request it still waits
  for on a connection it closed — whatever the delay before the read, which no
  single-clock budget can bound (a request held in our socket while we were stopped).

Checked before the application runs (refused: it does not run) and before the commit at
its response head (refused: nothing is applied). A commit that finished past the budget
stays (a retry with the same request id is undone by the exactly-once rule), but is not
acknowledged: 503 instead of the application's status.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

import structlog

from tandem.logs import short

__all__ = ["DEADLINE_HEADER", "Arrival", "Deadline", "send_late"]

log = structlog.get_logger("tandem.http")

DEADLINE_HEADER = b"x-tandem-deadline"  # (as the HTTP server hands names: lowercased)
# A duration we rely on being at most T is measured as T / (1 + 2ρ), ρ = 1 % (the failure
# model's clock-rate bound): the budget is the proxy's clock, the elapsed time ours.
_RATE_MARGIN = 1.02
_MAX_BUDGET_MS = 10**9  # (a budget beyond this is no number a proxy sends)

_monotonic = time.monotonic


class Arrival(Protocol):
    """What the HTTP server knows of a request's arrival (backends.serve.cycle)."""

    read_at: float

    def peer_closed(self) -> bool: ...


class Deadline:
    """One proxied request's deadline."""

    __slots__ = ("arrival", "budget_ms", "_budget_s", "rid", "sid")

    def __init__(self, arrival: Arrival, budget_ms: int, *, rid: str | None,
                 sid: str | None) -> None:
        self.arrival = arrival
        self.budget_ms = budget_ms
        self._budget_s = budget_ms / 1000 / _RATE_MARGIN
        self.rid = rid  # for the log: the proxy's request id (no secret), the sid's prefix
        self.sid = short(sid)

    @classmethod
    def of(cls, scope: MutableMapping[str, Any], value: bytes, *, rid: str | None,
           sid: str | None) -> Deadline | None:
        """The request's deadline, or None: no arrival known (another server runs the
        app), or a value that is not a number of milliseconds (logged)."""
        arrival: Arrival | None = scope.get("tandem.arrival")
        if arrival is None:
            return None
        if not value.isdigit() or not 0 < int(value) <= _MAX_BUDGET_MS:
            log.warning("bad_deadline_header", value=value[:20].decode("latin-1"), rid=rid)
            return None
        return cls(arrival, int(value), rid=rid, sid=sid)

    def elapsed_ms(self) -> int:
        return int((_monotonic() - self.arrival.read_at) * 1000)

    def missed(self, *, stage: str) -> str | None:
        """Why the proxy is no longer waiting ("deadline", "connection_closed"), logged as
        this request's refusal at `stage` ("start", "commit"); None while it may be."""
        if _monotonic() - self.arrival.read_at >= self._budget_s:
            reason = "deadline"
        elif self.arrival.peer_closed():
            reason = "connection_closed"
        else:
            return None
        log.warning("request_refused_late", reason=reason, stage=stage, rid=self.rid,
                    sid=self.sid, elapsed_ms=self.elapsed_ms(), budget_ms=self.budget_ms)
        return reason

    def committed_late(self) -> bool:
        """After a commit: whether it finished past the budget (logged), so that it must
        not be acknowledged. (A closed connection needs no such care: no one reads it.)"""
        if _monotonic() - self.arrival.read_at < self._budget_s:
            return False
        log.warning("commit_past_deadline", rid=self.rid, sid=self.sid,
                    elapsed_ms=self.elapsed_ms(), budget_ms=self.budget_ms)
        return True


async def send_late(send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
                    body: bytes) -> None:
    """503 `X-Tandem-State: late`, and the connection closes (the proxy has let it go)."""
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"0"), (b"x-tandem-state", b"late"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
