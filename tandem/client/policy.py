"""What the client may send again after a failure: the proxy's rules (docs/client.md).

- a connect failure (refused, unreachable, connect timeout): nothing was sent, so the next
  candidate is always tried;
- a 503 from a backend: the server declined the request before applying it (draining, no
  lease, the session lives elsewhere...), so the next candidate is tried, whatever the
  method — when the body can be sent again;
- a failure after the request was sent (connection reset, read timeout): the request may
  have been applied, so only idempotent methods go on, unless the caller opted in
  (`retry="all"`); `retry="none"` retries none of them. The request id header makes such a
  retry apply once on the backend anyway (docs/replication.md).
"""

from __future__ import annotations

import enum

__all__ = ["IDEMPOTENT", "RETRY_CHOICES", "Failure", "may_retry", "SESSION_STATES"]

# RFC 9110 idempotent methods: what retry="idempotent" re-sends after a send.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
RETRY_CHOICES = ("idempotent", "all", "none")

# X-Tandem-State of a 503 that concerns one session, not its server: the server keeps its
# place (no skip mark); the request still goes to the next candidate.
SESSION_STATES = frozenset({"unprotected", "owner-unreachable", "late"})


class Failure(enum.Enum):
    CONNECT = "connect"  # no connection: nothing of the request left
    CONNECT_TIMEOUT = "connect_timeout"  # no connection within the caller's timeout
    DECLINED = "503"  # the backend answered 503: nothing applied
    RESET = "reset"  # the connection died after the request was (maybe) sent
    TIMEOUT = "timeout"  # no response within the caller's read timeout

    @property
    def nothing_sent(self) -> bool:
        return self in (Failure.CONNECT, Failure.CONNECT_TIMEOUT)

    @property
    def marks_bad(self) -> bool:
        """Skip the server for `max_skip_s` (the proxy does the same; a reset alone does
        not: the next request finds out by a quick connect failure)."""
        return self is not Failure.RESET


def may_retry(failure: Failure, *, method: str, retry: str, replayable: bool,
              sent_before: bool) -> bool:
    """May the request go to the next candidate after `failure`?

    `replayable`: the body can be sent again (bytes, not a stream); `sent_before`: an
    earlier attempt already wrote the request somewhere (so a new one needs a replay).
    """
    if failure.nothing_sent and not sent_before:
        return True  # the body has not moved
    if not replayable:
        return False
    if failure.nothing_sent or failure is Failure.DECLINED:
        return True  # never reached an application, or the server declined it
    return retry == "all" or (retry == "idempotent" and method.upper() in IDEMPOTENT)
